"""collect_qa: read what is new in the inbox (and an optional SQL table) into a ledgered batch.

Inbox: a local path or any fsspec URI (`s3://bucket/inbox`, `memory://...`); JSONL, CSV and
Markdown files. Files are never modified or deleted and are identified by content hash: one
already processed is skipped, so the same file copied twice or a re-run never counts twice. A
file whose last record is truncated (still being written) is *deferred*: its records are ledgered
as deferred and the file is read again once complete (its hash then differs). Unsafe names
(control or invisible characters, `..`, absolute paths, a leading `-`, symlinks leading out of the
inbox, anything not a regular file) are refused with a ledger row; nothing outside is opened.

Files are streamed, never read whole: one pass hashes, a second parses record by record (and
re-hashes, so a file rewritten in between is left for the next run), and ledger rows are inserted
CHUNK_ROWS at a time into the open transaction. A 2 GB file costs the memory of one record.

SQL source: `url#table`, rows with `updated_at` after the stored watermark.

The batch (ledger rows, files marked processed, watermark, batch row) commits in one transaction;
a retried task finds the batch and returns it unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from shoefix_tasks.config import Settings
from shoefix_tasks.intake.formats import MAX_RECORD_BYTES, ParsedLine, inspect_stream, iter_records
from shoefix_tasks.intake.inbox import HashingReader, InboxFile, list_inbox, open_file, unsafe_name
from shoefix_tasks.records import content_hash
from shoefix_tasks.store import ledger

log = logging.getLogger(__name__)
CHUNK_ROWS = 5_000  # ledger rows per INSERT: bounds memory, amortizes round trips


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


def row_for(batch_id: str, source: str, sha: str, pl: ParsedLine, truncated: bool) -> dict[str, Any]:
    if truncated:
        return _row(batch_id, source, sha, pl, "deferred", "truncated_file",
                    "file still being written (truncated last record)")
    if pl.record is None:
        check = "oversize" if pl.error and "-byte limit" in pl.error else "parse"
        return _row(batch_id, source, sha, pl, "quarantined", check, pl.error)
    return _row(batch_id, source, sha, pl, "collected", None, None)


def rows_for(batch_id: str, source: str, sha: str, lines: Iterable[ParsedLine], truncated: bool) -> list[dict[str, Any]]:
    return [row_for(batch_id, source, sha, pl, truncated) for pl in lines]


class _Sink:
    """Ledger rows go into the open transaction in chunks, never all held at once."""

    def __init__(self, conn: sa.Connection, chunk: int = CHUNK_ROWS) -> None:
        self.conn, self.chunk, self.rows = conn, chunk, []
        self.counts: Counter[str] = Counter()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.counts[row["status"]] += 1
        if len(self.rows) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.conn.execute(sa.insert(ledger.records), self.rows)
            self.rows = []


def _scan_file(fs: Any, f: InboxFile, batch_id: str, sink: _Sink, done: set[str], max_record_bytes: int,
               now: Any, inbox: str) -> dict[str, Any] | None:
    """Ledger one inbox file (two streaming passes); returns its `inbox_files` row, or None when it
    is skipped (already processed, unreadable, or changed while it was read: seen next run)."""
    suffix = os.path.splitext(f.name)[1].lower()
    try:
        with open_file(fs, f) as fh:
            facts = inspect_stream(suffix, fh, max_record_bytes)
    except OSError as err:
        log.warning("skipping inbox file %r this run: %s", f.name, err)
        return None
    if facts.sha256 in done:
        return None
    before = sink.counts.copy()
    problem = None
    try:
        with open_file(fs, f) as fh:
            tee = HashingReader(fh, facts.size)
            for pl in iter_records(suffix, io.BufferedReader(tee, 1 << 20), max_record_bytes):
                sink.add(row_for(batch_id, f.name, facts.sha256, pl, facts.truncated))
            while tee.read(1 << 20):  # a parser may stop early (a CSV error at the end): hash the rest
                pass
        if tee.digest.hexdigest() != facts.sha256:
            problem = "it changed while it was read"
    except OSError as err:
        problem = str(err)
    if problem:
        log.warning("inbox file %r left for the next run: %s", f.name, problem)
        sink.flush()
        sink.conn.execute(sa.delete(ledger.records).where(ledger.records.c.batch_id == batch_id,
                                                          ledger.records.c.file_sha == facts.sha256))
        sink.counts = before
        return None
    done.add(facts.sha256)  # the same content under two names in one scan counts once
    return {"file_sha": facts.sha256, "source": inbox, "name": f.name, "size": facts.size,
            "status": "deferred" if facts.truncated else "processed", "batch_id": batch_id, "seen_at": now}


def _scan_inbox(settings: Settings, batch_id: str, sink: _Sink, done: set[str], only: list[str] | None = None,
                max_record_bytes: int = MAX_RECORD_BYTES) -> list[dict]:
    files: list[dict[str, Any]] = []
    now = ledger.utcnow()
    if only is not None:
        for name in only:
            if why := unsafe_name(name):
                raise ValueError(f"refusing file {name!r}: {why}")
    fs, listing = list_inbox(settings.inbox)
    if only is not None:
        wanted = set(only)
        missing = wanted - {f.name for f in listing}
        if missing:
            raise FileNotFoundError(f"not in inbox {settings.inbox}: {sorted(missing)}")
        listing = [f for f in listing if f.name in wanted]
    for f in listing:
        if f.unsafe:
            sha = hashlib.sha256(f"unsafe:{f.path}".encode("utf-8", "surrogateescape")).hexdigest()
            if sha in done:
                continue
            done.add(sha)
            shown = repr(f.name)[:1000]
            pl = ParsedLine(0, f.name.encode("utf-8", "surrogateescape")[:1000], None, f.unsafe)
            sink.add(_row(batch_id, shown, sha, pl, "quarantined", "unsafe_path", f.unsafe))
            files.append({"file_sha": sha, "source": settings.inbox, "name": shown, "size": 0,
                          "status": "processed", "batch_id": batch_id, "seen_at": now})
            continue
        if (row := _scan_file(fs, f, batch_id, sink, done, max_record_bytes, now, settings.inbox)) is not None:
            files.append(row)
    return files


def _scan_sql(source: str, batch_id: str, sink: _Sink) -> dict | None:
    """Rows of `url#table` updated after the stored watermark, into the sink; returns the new
    watermark. The URL's password never reaches the ledger or the log."""
    url, _, table = source.partition("#")
    if not table:
        raise ValueError(f"SQL source must look like 'sqlalchemy-url#table', got {source!r}")
    safe_source = f"sql:{sa.engine.make_url(url).render_as_string(hide_password=True)}#{table}"
    mark = sink.conn.execute(sa.select(ledger.watermarks.c.value)
                             .where(ledger.watermarks.c.source == safe_source)).scalar()
    src = sa.create_engine(url)
    tbl = sa.Table(table, sa.MetaData(), autoload_with=src)
    q = sa.select(tbl).order_by(tbl.c.updated_at)
    if mark is not None:
        q = q.where(tbl.c.updated_at > mark)
    # the file hash of a SQL "file" names the slice read; it is only known at the end, so rows are
    # buffered per slice of CHUNK_ROWS under a provisional key and re-keyed once (one UPDATE).
    provisional = hashlib.sha256(f"{safe_source}|{mark}|{batch_id}|pending".encode()).hexdigest()
    new_mark = None
    with src.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=CHUNK_ROWS).execute(q).mappings()
        for i, r in enumerate(result, start=1):
            rec = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in r.items()}
            pl = ParsedLine(i, json.dumps(rec, ensure_ascii=False).encode(), rec)
            sink.add(row_for(batch_id, safe_source, provisional, pl, False))
            new_mark = str(r["updated_at"])
    src.dispose()
    if new_mark is None:
        return None
    sink.flush()
    sha = hashlib.sha256(f"{safe_source}|{mark}|{new_mark}".encode()).hexdigest()
    sink.conn.execute(sa.update(ledger.records).where(ledger.records.c.batch_id == batch_id,
                                                      ledger.records.c.file_sha == provisional).values(file_sha=sha))
    return {"source": safe_source, "value": new_mark}


def collect_batch(settings: Settings, batch_id: str, sql_source: str | None = None,
                  only: list[str] | None = None, max_record_bytes: int = MAX_RECORD_BYTES) -> BatchRef:
    """`only`: restrict to these inbox-relative file names (an urgent update names its files).
    Memory is bounded by `max_record_bytes` and CHUNK_ROWS, whatever the size of a file."""
    engine = ledger.engine_for(settings.ledger_url)
    existing = ledger.batch_row(engine, batch_id)
    if existing is not None:
        log.info("batch %s already collected; returning it (retry)", batch_id)
        return BatchRef(batch_id=batch_id, **existing["counts"]["collect"])

    with engine.connect() as conn:
        done = {sha for (sha,) in conn.execute(
            sa.select(ledger.inbox_files.c.file_sha).where(ledger.inbox_files.c.status == "processed"))}
    with engine.begin() as conn:
        sink = _Sink(conn)
        files = _scan_inbox(settings, batch_id, sink, done, only, max_record_bytes)
        mark = _scan_sql(sql_source, batch_id, sink) if sql_source else None
        sink.flush()
        counts = {"files": len(files), "seen": sum(sink.counts.values()), "collected": sink.counts["collected"],
                  "quarantined": sink.counts["quarantined"], "deferred": sink.counts["deferred"]}
        for i in range(0, len(files), CHUNK_ROWS):
            part = files[i:i + CHUNK_ROWS]
            # a deferred file may be seen again (same hash, still incomplete): replace, don't duplicate
            conn.execute(sa.delete(ledger.inbox_files).where(
                ledger.inbox_files.c.file_sha.in_([f["file_sha"] for f in part])))
            conn.execute(sa.insert(ledger.inbox_files), part)
        if mark:
            conn.execute(sa.delete(ledger.watermarks).where(ledger.watermarks.c.source == mark["source"]))
            conn.execute(sa.insert(ledger.watermarks), [mark])
        conn.execute(sa.insert(ledger.batches), [{
            "batch_id": batch_id, "created_at": ledger.utcnow(), "status": "collected",
            "counts": json.dumps({"collect": counts}),
        }])
    log.info("collected batch %s: %s", batch_id, counts)
    return BatchRef(batch_id=batch_id, **counts)
