"""The intake ledger: one row per record seen, and the accepted corpus.

SQLite in the embedded default, Postgres in the full stack (any SQLAlchemy URL). Every task that
writes here does so in one transaction, so a crash leaves either all of a step's rows or none.

Tables
- `batches`: one per pipeline run (`batch_id` = the Airflow run id), its status and counts.
- `inbox_files`: every inbox file seen, by content hash; `processed` only after its rows commit.
- `records`: one row per record seen (file, line, content hash, status, reason, raw bytes).
- `corpus`: accepted records, unique by content hash; the training snapshot is built from it.
- `watermarks`: how far each SQL source has been read.
- `champion_history`: who held the `champion` alias, when and why (MLflow keeps no history).
- `leases`: named locks with an expiry (the promotion lock); see `Lease`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa

log = logging.getLogger(__name__)
metadata = sa.MetaData()

batches = sa.Table(
    "batches", metadata,
    sa.Column("batch_id", sa.String(250), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # collected | validated
    sa.Column("counts", sa.Text, nullable=False, default="{}"),
    sa.Column("snapshot_hash", sa.String(64)),
)

inbox_files = sa.Table(
    "inbox_files", metadata,
    sa.Column("file_sha", sa.String(64), primary_key=True),
    sa.Column("source", sa.String(1000), nullable=False),
    sa.Column("name", sa.String(1000), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # processed | deferred
    sa.Column("batch_id", sa.String(250), nullable=False),
    sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
)

records = sa.Table(
    "records", metadata,
    sa.Column("row_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.String(250), nullable=False, index=True),
    sa.Column("source", sa.String(1000), nullable=False),
    sa.Column("file_sha", sa.String(64), nullable=False),
    sa.Column("line_no", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String(64), index=True),
    sa.Column("record_id", sa.String(250)),
    sa.Column("status", sa.String(20), nullable=False),  # collected | accepted | quarantined | deferred
    sa.Column("check_name", sa.String(100)),
    sa.Column("reason", sa.Text),
    sa.Column("payload", sa.Text),  # the parsed record as JSON (None when it did not parse)
    sa.Column("raw", sa.LargeBinary),  # the raw bytes, kept for quarantined rows so they can be replayed
    sa.UniqueConstraint("batch_id", "file_sha", "line_no", name="uq_record_position"),
)

corpus = sa.Table(
    "corpus", metadata,
    sa.Column("content_hash", sa.String(64), primary_key=True),
    sa.Column("question_key", sa.String(64), nullable=False, index=True),
    sa.Column("record_id", sa.String(250), nullable=False),
    sa.Column("lang", sa.String(10), nullable=False),
    sa.Column("topic", sa.String(40), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("batch_id", sa.String(250), nullable=False),
    sa.Column("ledger_row", sa.Integer, nullable=False),
)

watermarks = sa.Table(
    "watermarks", metadata,
    sa.Column("source", sa.String(1000), primary_key=True),
    sa.Column("value", sa.String(100), nullable=False),
)

champion_history = sa.Table(
    "champion_history", metadata,
    sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(250), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("previous_version", sa.Integer),
    sa.Column("action", sa.String(20), nullable=False),  # promote | rollback | rollback-forced
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("actor", sa.String(250), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)


leases = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("holder", sa.String(250), nullable=False),
    sa.Column("token", sa.String(32), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),  # unix seconds (the holders' clocks: NTP-synced)
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
)


def utcnow() -> datetime:
    return datetime.now(UTC)


@lru_cache(maxsize=8)
def engine_for(url: str) -> sa.Engine:
    """One engine per URL per process; creates the tables (idempotent)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        # WAL lets readers (the UI page, a second run) proceed while a task writes.
        @sa.event.listens_for(engine, "connect")
        def _pragma(conn, _record):  # pragma: no cover - trivial
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
    metadata.create_all(engine)
    return engine


def batch_row(engine: sa.Engine, batch_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(batches).where(batches.c.batch_id == batch_id)).mappings().first()
    if row is None:
        return None
    out = dict(row)
    out["counts"] = json.loads(out["counts"] or "{}")
    return out


def status_counts(engine: sa.Engine, batch_id: str) -> dict[str, int]:
    q = (sa.select(records.c.status, sa.func.count())
         .where(records.c.batch_id == batch_id).group_by(records.c.status))
    with engine.connect() as conn:
        return {status: n for status, n in conn.execute(q)}


def quarantine_reasons(engine: sa.Engine, batch_id: str) -> dict[str, int]:
    q = (sa.select(records.c.check_name, sa.func.count())
         .where(records.c.batch_id == batch_id, records.c.status == "quarantined")
         .group_by(records.c.check_name))
    with engine.connect() as conn:
        out: dict[str, int] = {}
        for name, n in conn.execute(q):
            key = (name or "unknown").split("(")[0]
            out[key] = out.get(key, 0) + n
        return out


def corpus_rows(engine: sa.Engine, languages: list[str] | None = None) -> list[dict[str, Any]]:
    q = sa.select(corpus.c.payload).order_by(corpus.c.content_hash)
    if languages:
        q = q.where(corpus.c.lang.in_(languages))
    with engine.connect() as conn:
        return [json.loads(p) for (p,) in conn.execute(q)]


class LeaseLost(RuntimeError):
    """The lease expired or was taken over while we believed we held it."""


class LeaseTimeout(TimeoutError):
    """Another holder kept the lease longer than we were willing to wait."""


class Lease:
    """A named lock in the ledger that holds across processes and hosts, on SQLite and Postgres.

    Taking it is one atomic statement: INSERT the row, or UPDATE it where it has expired. Each is
    a single-row write, serialized by the database (SQLite's write lock, Postgres' row lock), so
    exactly one contender's statement matches. No transaction stays open while the lock is held:
    a long-held SQLite write transaction would block every other ledger writer (intake included).

    The holder renews the lease every `ttl_s / 3` seconds from a background thread, so a live holder
    keeps it for as long as it works, and a crashed one (SIGKILL, lost node) blocks others for at
    most `ttl_s`. `check()` (call it right before an irreversible step) raises `LeaseLost` if the
    lease was lost, e.g. because the holder stalled for longer than `ttl_s`.
    """

    def __init__(self, engine: sa.Engine, name: str, holder: str, ttl_s: float = 60.0, wait_s: float = 3600.0,
                 poll_s: float = 0.5):
        self.engine, self.name, self.holder = engine, name, holder
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self.token = uuid.uuid4().hex
        self.waited_s = 0.0
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None

    def _try_take(self) -> bool:
        now = time.time()
        row = {"holder": self.holder, "token": self.token, "expires_at": now + self.ttl_s, "acquired_at": utcnow()}
        with self.engine.begin() as conn:
            stale = conn.execute(sa.select(leases.c.holder).where(leases.c.name == self.name,
                                                                  leases.c.expires_at < now)).scalar()
            if stale is not None and conn.execute(
                    sa.update(leases).where(leases.c.name == self.name, leases.c.expires_at < now)
                    .values(**row)).rowcount:
                log.warning("lease %s of %s had expired (crashed or stalled): taken over by %s",
                            self.name, stale, self.holder)
                return True
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(leases).values(name=self.name, **row))
            return True
        except sa.exc.IntegrityError:  # held (and not expired) by someone else
            return False

    def _renew(self) -> bool:
        with self.engine.begin() as conn:
            return bool(conn.execute(sa.update(leases).where(leases.c.name == self.name, leases.c.token == self.token)
                                     .values(expires_at=time.time() + self.ttl_s)).rowcount)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self._renew():
                    self._lost = f"lease {self.name} was taken over by another holder"
                    return
            except sa.exc.SQLAlchemyError as err:  # the DB is briefly unreachable: keep trying until expiry
                log.warning("could not renew lease %s: %s", self.name, err)

    def holder_now(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(leases.c.holder).where(leases.c.name == self.name,
                                                                 leases.c.expires_at >= time.time())).scalar()

    def acquire(self) -> Lease:
        t0 = time.monotonic()
        logged = False
        while not self._try_take():
            if time.monotonic() - t0 > self.wait_s:
                raise LeaseTimeout(f"lease {self.name} still held by {self.holder_now()} after {self.wait_s:.0f}s")
            if not logged:
                log.info("waiting for lease %s, held by %s", self.name, self.holder_now())
                logged = True
            time.sleep(self.poll_s)
        self.waited_s = time.monotonic() - t0
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        log.info("lease %s taken by %s after %.1fs", self.name, self.holder, self.waited_s)
        return self

    def check(self) -> None:
        """Raise LeaseLost unless we still hold the lease (renewing it as a side effect)."""
        if self._lost or not self._renew():
            raise LeaseLost(self._lost or f"lease {self.name} is no longer held by {self.holder}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self.engine.begin() as conn:
            conn.execute(sa.delete(leases).where(leases.c.name == self.name, leases.c.token == self.token))

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
