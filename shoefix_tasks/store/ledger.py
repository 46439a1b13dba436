"""The intake ledger: one row per record seen, and the accepted corpus.

SQLite in the embedded default, Postgres in the full stack (any SQLAlchemy URL). Every task that
writes here does so in one transaction, so a crash leaves either all of a step's rows or none.

Tables
- `batches`: one per pipeline run (`batch_id` = the Airflow run id), its status and counts.
- `inbox_files`: every inbox file seen, by content hash; `processed` only after its rows commit;
  `deferred` while its cut-off last record waits for its writer (`superseded` once that file
  state is gone), with the file's mtime in `modified_at` (the grace clock; see intake/deferral.py).
- `records`: one row per record seen (file, line, content hash, status, reason, raw bytes).
- `corpus`: accepted records, unique by content hash; the training snapshot is built from it.
- `watermarks`: how far each SQL source has been read.
- `champion_history`: who held the `champion` alias, when and why (MLflow keeps no history).
- `leases`: named locks with an expiry (the promotion lock); see `Lease`.
"""

from __future__ import annotations

import json
import logging
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
    sa.Column("status", sa.String(20), nullable=False),  # processed | deferred | superseded
    sa.Column("batch_id", sa.String(250), nullable=False),
    sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("modified_at", sa.DateTime(timezone=True)),  # the file's mtime when seen (None: not reported)
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
    sa.Column("action", sa.String(20), nullable=False),  # promote | promote-reviewed | rollback | rollback-forced | review-{rejected,timeout,stale}
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
    _add_columns(engine)
    return engine


# Columns added to existing tables after a release: create_all makes only missing tables, so an
# older ledger gets them here (additive and nullable: older code ignores them, nothing is rewritten).
ADDED_COLUMNS = (("inbox_files", "modified_at"),)  # 2026-12: the truncated-file grace clock


def _add_columns(engine: sa.Engine) -> None:
    for table, column in ADDED_COLUMNS:
        if column in {c["name"] for c in sa.inspect(engine).get_columns(table)}:
            continue
        kind = metadata.tables[table].c[column].type.compile(dialect=engine.dialect)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
        except sa.exc.DBAPIError:  # another process added it first
            if column not in {c["name"] for c in sa.inspect(engine).get_columns(table)}:
                raise
        log.info("ledger: added column %s.%s", table, column)


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
