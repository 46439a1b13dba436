"""Files whose last record is cut off: how long to wait for their writer, and what a run says.

A cut-off last record means a writer still writing, or one that died. Within the grace period
(`SHOEFIX_TRUNCATED_GRACE_S`, default 3600 s) the whole file is deferred: the first run that sees
a file state (its content hash) writes one `deferred` ledger row for it, and later runs that find
the same state add nothing. Once the file is older than the grace, its complete records are
processed as usual and only the cut-off tail is quarantined (check `truncated`, raw bytes kept),
so every record of the file gets exactly one ledger row. A file that changes is a new state: it
is judged afresh, and the deferred row of the old state is marked `superseded`.

The age is measured from the file's mtime (its last write), not from when a run first saw it:
a writer that is still writing keeps moving the mtime, so "not written for the grace period" is
the direct sign that it stopped, and a file abandoned days before the weekly run is processed in
that run instead of waiting one more week. Where the filesystem reports no mtime, the age counts
from the first run that saw this state, as it does when the mtime is more than five minutes
ahead of our clock (else a file stamped years ahead would wait for years); a little ahead reads as age 0.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import IO, Any

import sqlalchemy as sa

from shoefix_tasks.intake.inbox import InboxFile
from shoefix_tasks.store import ledger

GRACE_ENV = "SHOEFIX_TRUNCATED_GRACE_S"
DEFAULT_GRACE_S = 3600.0
CHECK = "truncated_file"  # the deferred row's check name


def grace_s(value: str | float | None = None) -> float:
    """The grace period in seconds: `value`, else $SHOEFIX_TRUNCATED_GRACE_S, else one hour."""
    raw = os.environ.get(GRACE_ENV) if value is None else value
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return DEFAULT_GRACE_S
    try:
        out = float(raw)
    except ValueError:
        out = -1.0
    if not out >= 0 or out == float("inf"):
        raise ValueError(f"{GRACE_ENV} must be a number of seconds >= 0 (e.g. 3600), got {raw!r}")
    return out


def aware(when: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they were written in UTC."""
    return when.replace(tzinfo=UTC) if when is not None and when.tzinfo is None else when


def modified_at(fs: Any, f: InboxFile, fh: IO[bytes]) -> datetime | None:
    """The file's last write: fstat of the open file when local (the bytes just hashed), else
    what the filesystem reports; None when it reports nothing."""
    try:
        if f.real is not None:
            return datetime.fromtimestamp(os.fstat(fh.fileno()).st_mtime, UTC)
        return aware(fs.modified(f.path))
    except (NotImplementedError, OSError, AttributeError, KeyError, TypeError, ValueError):
        return None


FUTURE_TOLERANCE_S = 300.0  # clock skew between the inbox's filesystem and us that is still believed


def age_s(now: datetime, modified: datetime | None, first_seen: datetime | None) -> float:
    modified = aware(modified)
    if modified is not None and (modified - now).total_seconds() > FUTURE_TOLERANCE_S:
        modified = None  # a clock far ahead (an extracted archive, a bad NFS clock): not a sign of life
    since = modified or aware(first_seen) or now
    return max(0.0, (now - since).total_seconds())


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h".replace(".0 h", " h")
    return f"{seconds / 86400:.0f} days"


@dataclass
class Waiting:
    """A file deferred in this run (new: its deferred row was written now; else seen before)."""

    name: str
    age_s: float
    grace_s: float
    new: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def deferred_reason(line_no: int, why: str, age: float, grace: float) -> str:
    return (f"file still being written? its last record (#{line_no}) is cut off ({why}); last written "
            f"{human(age)} ago, grace {human(grace)}: read again when it changes or once older than the grace")


def known_deferred(conn: sa.Connection, inbox: str) -> dict[str, dict[str, Any]]:
    """sha -> the deferred `inbox_files` row of each file state of this inbox waiting for its writer."""
    f = ledger.inbox_files
    rows = conn.execute(sa.select(f.c.file_sha, f.c.name, f.c.seen_at, f.c.modified_at)
                        .where(f.c.status == "deferred", f.c.source == inbox)).mappings()
    return {r["file_sha"]: dict(r) for r in rows}


def supersede(conn: sa.Connection, inbox: str, listed: dict[str, str | None], complete: bool) -> int:
    """Mark `superseded` the deferred states that are no longer in the inbox: the file now has
    other content, or (`complete`: the whole inbox was listed) it is gone. An unreadable file
    (sha None) keeps its row. Returns how many rows changed."""
    f = ledger.inbox_files
    stale = [sha for sha, row in known_deferred(conn, inbox).items()
             if (row["name"] in listed and listed[row["name"]] not in (None, sha))
             or (complete and row["name"] not in listed)]
    if stale:
        conn.execute(sa.update(ledger.inbox_files).where(f.c.file_sha.in_(stale), f.c.status == "deferred")
                     .values(status="superseded"))
    return len(stale)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary(counts: dict[str, int], waiting: list[Waiting], checks: dict[str, int]) -> str:
    """One line saying what this run did, e.g. "nothing new: 1 file deferred (a.jsonl: truncated,
    4 min old, grace 60 min)". `checks`: quarantined records by check name."""
    parts = []
    if counts.get("collected"):
        parts.append(f"collected {_plural(counts['collected'], 'new record')}"
                     + (f" from {_plural(counts['files'], 'file')}" if counts.get("files") else ""))
    if counts.get("quarantined"):
        why = ", ".join(f"{k} {n}" for k, n in sorted(checks.items(), key=lambda kv: (-kv[1], kv[0])))
        parts.append(f"{_plural(counts['quarantined'], 'record')} quarantined at intake ({why})")
    if waiting:
        shown = "; ".join(f"{w.name}: truncated, {human(w.age_s)} old" for w in waiting[:5])
        more = f"; {len(waiting) - 5} more" if len(waiting) > 5 else ""
        parts.append(f"{_plural(len(waiting), 'file')} deferred ({shown}{more}; grace {human(waiting[0].grace_s)})")
    if counts.get("collected"):
        return "; ".join(parts)
    if not parts:
        return "nothing new: no new or changed inbox files since the last run"
    return ("nothing new to validate: " if counts.get("quarantined") else "nothing new: ") + "; ".join(parts)
