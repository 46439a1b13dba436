"""collect_qa: read what is new in the inbox (and an optional SQL table) into a ledgered batch.

Inbox: a local path or any fsspec URI (`s3://bucket/inbox`, `memory://...`); JSONL, CSV and
Markdown files. Files are never modified or deleted and are identified by content hash: one
already processed is skipped, so the same file copied twice or a re-run never counts twice. A
file whose last record is truncated (still being written) is *deferred*: its records are ledgered
as deferred and the file is read again once complete (its hash then differs). Unsafe names
(control characters, symlinks leading out of the inbox) are refused with a ledger row.

SQL source: `url#table`, rows with `updated_at` after the stored watermark.

The batch (ledger rows, files marked processed, watermark, batch row) commits in one transaction;
a retried task finds the batch and returns it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from shoefix_tasks import ledger
from shoefix_tasks.config import Settings
from shoefix_tasks.formats import PARSERS, ParsedLine, parse_bytes
from shoefix_tasks.records import content_hash

log = logging.getLogger(__name__)


@dataclass
class BatchRef:
    batch_id: str
    files: int
    seen: int
    collected: int
    quarantined: int
    deferred: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InboxFile:
    name: str  # relative to the inbox root
    path: str  # as the filesystem knows it
    unsafe: str | None = None  # why it is refused, if it is


def unsafe_name(name: str) -> str | None:
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "file name contains control characters"
    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        return "file name escapes the inbox"
    return None


def list_inbox(inbox: str) -> tuple[Any, list[InboxFile]]:
    """(filesystem, files) for a path or URI, sorted by name; refusals are listed too."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(inbox)
    if not fs.exists(root):
        raise FileNotFoundError(f"inbox {inbox} does not exist")
    root = root.rstrip("/")
    local = fs.protocol in ("file", "local") or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else ())
    real_root = os.path.realpath(root) if local else root
    out = []
    for path in sorted(fs.find(root)):
        name = path[len(root):].lstrip("/")
        if os.path.splitext(name)[1].lower() not in PARSERS:
            continue
        why = unsafe_name(name)
        if why is None and local:
            real = os.path.realpath(path)
            if os.path.commonpath([real, real_root]) != real_root:
                why = "symlink points outside the inbox"
        out.append(InboxFile(name, path, why))
    return fs, out


def _row(batch_id: str, source: str, sha: str, pl: ParsedLine, status: str, check: str | None,
         reason: str | None) -> dict[str, Any]:
    rec = pl.record or {}
    q, a = rec.get("question"), rec.get("answer")
    return {
        "batch_id": batch_id, "source": source, "file_sha": sha, "line_no": pl.line_no,
        "content_hash": content_hash(q, a) if isinstance(q, str) and isinstance(a, str) else None,
        "record_id": str(rec.get("id"))[:250] if rec.get("id") is not None else None,
        "status": status, "check_name": check, "reason": reason,
        "payload": json.dumps(pl.record, ensure_ascii=False) if pl.record is not None else None,
        "raw": pl.raw if status != "collected" else None,
    }


def rows_for(batch_id: str, source: str, sha: str, lines: list[ParsedLine], truncated: bool) -> list[dict[str, Any]]:
    out = []
    for pl in lines:
        if truncated:
            out.append(_row(batch_id, source, sha, pl, "deferred", "truncated_file",
                            "file still being written (truncated last record)"))
        elif pl.record is None:
            out.append(_row(batch_id, source, sha, pl, "quarantined", "parse", pl.error))
        else:
            out.append(_row(batch_id, source, sha, pl, "collected", None, None))
    return out


def _scan_inbox(settings: Settings, batch_id: str, done: set[str],
                only: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    rows: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    now = ledger.utcnow()
    fs, listing = list_inbox(settings.inbox)
    if only is not None:
        for name in only:
            if why := unsafe_name(name):
                raise ValueError(f"refusing file {name!r}: {why}")
        wanted = set(only)
        missing = wanted - {f.name for f in listing}
        if missing:
            raise FileNotFoundError(f"not in inbox {settings.inbox}: {sorted(missing)}")
        listing = [f for f in listing if f.name in wanted]
    for f in listing:
        if f.unsafe:
            sha = hashlib.sha256(f"unsafe:{f.path}".encode()).hexdigest()
            if sha in done:
                continue
            done.add(sha)
            pl = ParsedLine(0, f.name.encode("utf-8", "backslashreplace")[:1000], None, f.unsafe)
            rows.append(_row(batch_id, repr(f.name)[:1000], sha, pl, "quarantined", "unsafe_path", f.unsafe))
            files.append({"file_sha": sha, "source": settings.inbox, "name": repr(f.name)[:1000], "size": 0,
                          "status": "processed", "batch_id": batch_id, "seen_at": now})
            continue
        data = fs.cat_file(f.path)
        sha = hashlib.sha256(data).hexdigest()
        if sha in done:
            continue
        done.add(sha)  # the same content under two names in one scan counts once
        lines, truncated = parse_bytes(os.path.splitext(f.name)[1], data)
        rows.extend(rows_for(batch_id, f.name, sha, lines, truncated))
        files.append({"file_sha": sha, "source": settings.inbox, "name": f.name, "size": len(data),
                      "status": "deferred" if truncated else "processed", "batch_id": batch_id, "seen_at": now})
    return rows, files


def _scan_sql(source: str, batch_id: str, engine: sa.Engine) -> tuple[list[dict], dict | None]:
    """Rows of `url#table` updated after the stored watermark; returns (ledger rows, new watermark)."""
    url, _, table = source.partition("#")
    if not table:
        raise ValueError(f"SQL source must look like 'sqlalchemy-url#table', got {source!r}")
    safe_source = f"sql:{sa.engine.make_url(url).render_as_string(hide_password=True)}#{table}"
    with engine.connect() as conn:
        mark = conn.execute(sa.select(ledger.watermarks.c.value)
                            .where(ledger.watermarks.c.source == safe_source)).scalar()
    src = sa.create_engine(url)
    tbl = sa.Table(table, sa.MetaData(), autoload_with=src)
    q = sa.select(tbl).order_by(tbl.c.updated_at)
    if mark is not None:
        q = q.where(tbl.c.updated_at > mark)
    with src.connect() as conn:
        found = [dict(r) for r in conn.execute(q).mappings()]
    src.dispose()
    if not found:
        return [], None
    new_mark = str(found[-1]["updated_at"])
    sha = hashlib.sha256(f"{safe_source}|{mark}|{new_mark}".encode()).hexdigest()
    lines = []
    for i, r in enumerate(found, start=1):
        rec = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in r.items()}
        lines.append(ParsedLine(i, json.dumps(rec, ensure_ascii=False).encode(), rec))
    return rows_for(batch_id, safe_source, sha, lines, False), {"source": safe_source, "value": new_mark}


def collect_batch(settings: Settings, batch_id: str, sql_source: str | None = None,
                  only: list[str] | None = None) -> BatchRef:
    """`only`: restrict to these inbox-relative file names (an urgent update names its files)."""
    engine = ledger.engine_for(settings.ledger_url)
    existing = ledger.batch_row(engine, batch_id)
    if existing is not None:
        log.info("batch %s already collected; returning it (retry)", batch_id)
        return BatchRef(batch_id=batch_id, **existing["counts"]["collect"])

    with engine.connect() as conn:
        done = {sha for (sha,) in conn.execute(
            sa.select(ledger.inbox_files.c.file_sha).where(ledger.inbox_files.c.status == "processed"))}
    rows, files = _scan_inbox(settings, batch_id, done, only)
    mark = None
    if sql_source:
        sql_rows, mark = _scan_sql(sql_source, batch_id, engine)
        rows.extend(sql_rows)

    counts = {
        "files": len(files), "seen": len(rows),
        "collected": sum(r["status"] == "collected" for r in rows),
        "quarantined": sum(r["status"] == "quarantined" for r in rows),
        "deferred": sum(r["status"] == "deferred" for r in rows),
    }
    with engine.begin() as conn:
        if rows:
            conn.execute(sa.insert(ledger.records), rows)
        for f in files:
            # a deferred file may be seen again (same hash, still incomplete): replace, don't duplicate
            conn.execute(sa.delete(ledger.inbox_files).where(ledger.inbox_files.c.file_sha == f["file_sha"]))
        if files:
            conn.execute(sa.insert(ledger.inbox_files), files)
        if mark:
            conn.execute(sa.delete(ledger.watermarks).where(ledger.watermarks.c.source == mark["source"]))
            conn.execute(sa.insert(ledger.watermarks), [mark])
        conn.execute(sa.insert(ledger.batches), [{
            "batch_id": batch_id, "created_at": ledger.utcnow(), "status": "collected",
            "counts": json.dumps({"collect": counts}),
        }])
    log.info("collected batch %s: %s", batch_id, counts)
    return BatchRef(batch_id=batch_id, **counts)
