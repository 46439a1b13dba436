"""A lease in the ledger: one holder at a time for a named resource, across processes and hosts.

Champion changes (the gate, a rollback) run under the `promotion:<model>` lease, so two runs never
interleave read-champion / compare / set-alias. A holder that crashes blocks the others only until
its lease expires (`ttl_s`); a live holder renews by acting. Built on one row per lease in the
ledger's `leases` table, taken with an insert-or-conditional-update (works on SQLite and Postgres).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import sqlalchemy as sa

from shoefix_tasks.store.ledger import leases, utcnow

log = logging.getLogger(__name__)

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
