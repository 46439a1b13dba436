"""collect_qa: read what is new in the inbox (and an optional SQL table) into a ledgered batch.

Inbox: a local path or any fsspec URI (`s3://bucket/inbox`, `memory://...`); JSONL, CSV and
Markdown files. Files are never modified or deleted and are identified by content hash: one
already processed is skipped, so the same file copied twice or a re-run never counts twice. A
file whose last record is cut off (a writer still writing, or one that died) is *deferred* for a
grace period, with one ledger row per file state; after it, its complete records proceed and the
cut-off tail is quarantined as `truncated` (intake/deferral.py says how and why). Unsafe names
(control or invisible characters, `..`, absolute paths, a leading `-`, symlinks leading out of the
inbox, anything not a regular file) are refused with a ledger row; nothing outside is opened.

Files are streamed, never read whole: one pass hashes, a second parses record by record (and
re-hashes, so a file rewritten in between is left for the next run), and ledger rows are inserted
CHUNK_ROWS at a time into the open transaction. A 2 GB file costs the memory of one record.

SQL source: `url#table`, rows with `updated_at` after the stored watermark.

The batch (ledger rows, files marked processed, watermark, batch row) commits in one transaction;
a retried task finds the batch and returns it unchanged. Its `summary` says in one line what the
run did ("nothing new: 1 file deferred (...)"), and is what the task logs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from shoefix_tasks.config import Settings
from shoefix_tasks.intake import deferral
from shoefix_tasks.intake.formats import MAX_RECORD_BYTES, ParsedLine, inspect_stream, iter_records
from shoefix_tasks.intake.inbox import HashingReader, InboxFile, list_inbox, open_file, unsafe_name
from shoefix_tasks.records import content_hash
from shoefix_tasks.store import ledger

log = logging.getLogger(__name__)
CHUNK_ROWS = 5_000  # ledger rows per INSERT: bounds memory, amortizes round trips
WAITING_SHOWN = 100  # deferred files listed in a batch's counts (and its XCom); all are counted


@dataclass
class BatchRef:
    batch_id: str
    files: int
    seen: int
    collected: int
    quarantined: int
    deferred: int  # deferred ledger rows written by this run: one per newly seen cut-off file state
    deferred_files: int = 0  # files deferred in this run, new or seen before (cut-off last record, within the grace)
    waiting: list[dict[str, Any]] = field(default_factory=list)  # the first WAITING_SHOWN of them (Waiting)
    summary: str = ""  # what this run did, in one line

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


def row_for(batch_id: str, source: str, sha: str, pl: ParsedLine) -> dict[str, Any]:
    """A parsed record is `collected`; one that did not parse (or was cut off) is `quarantined`
    under the parser's check name, with its raw bytes."""
    if pl.record is None:
        return _row(batch_id, source, sha, pl, "quarantined", pl.check, pl.error)
    return _row(batch_id, source, sha, pl, "collected", None, None)


def rows_for(batch_id: str, source: str, sha: str, lines: Iterable[ParsedLine]) -> list[dict[str, Any]]:
    return [row_for(batch_id, source, sha, pl) for pl in lines]


class _Sink:
    """Ledger rows go into the open transaction in chunks, never all held at once."""

    def __init__(self, conn: sa.Connection, chunk: int = CHUNK_ROWS) -> None:
        self.conn, self.chunk, self.rows = conn, chunk, []
        self.counts: Counter[str] = Counter()
        self.checks: Counter[str] = Counter()  # quarantined rows by check name

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.counts[row["status"]] += 1
        if row["status"] == "quarantined":
            self.checks[row["check_name"]] += 1
        if len(self.rows) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.conn.execute(sa.insert(ledger.records), self.rows)
            self.rows = []

    def drop_file(self, batch_id: str, sha: str, counts: Counter[str], checks: Counter[str]) -> None:
        """Take back the rows of one file written in this batch (still uncommitted)."""
        self.flush()
        self.conn.execute(sa.delete(ledger.records).where(ledger.records.c.batch_id == batch_id,
                                                          ledger.records.c.file_sha == sha))
        self.counts, self.checks = counts, checks


@dataclass
class _Scan:
    """What one collection run knows while it scans: the ledger's processed and deferred file
    states, the grace period, and what it found (deferred files, the inbox's name -> state)."""

    batch_id: str
    inbox: str
    sink: _Sink
    done: set[str]
    deferred: dict[str, dict[str, Any]]
    grace_s: float
    now: datetime
    max_record_bytes: int
    waiting: list[deferral.Waiting] = field(default_factory=list)
    listed: dict[str, str | None] = field(default_factory=dict)


def _scan_file(fs: Any, f: InboxFile, scan: _Scan) -> dict[str, Any] | None:
    """Ledger one inbox file (two streaming passes); returns its `inbox_files` row, or None when it
    is skipped (already processed, deferred and unchanged, unreadable, or changed while it was
    read: seen next run)."""
    suffix = os.path.splitext(f.name)[1].lower()
    scan.listed[f.name] = None
    try:
        with open_file(fs, f) as fh:
            facts = inspect_stream(fh)
            modified = deferral.modified_at(fs, f, fh)
    except OSError as err:
        log.warning("skipping inbox file %r this run: %s", f.name, err)
        return None
    sha, sink = facts.sha256, scan.sink
    scan.listed[f.name] = sha
    if sha in scan.done:
        return None
    known = scan.deferred.get(sha)
    age = deferral.age_s(scan.now, modified, known and known["seen_at"])
    waiting = age < scan.grace_s
    if known is not None and waiting:  # the same cut-off state as before, still within the grace: add nothing
        scan.done.add(sha)
        scan.waiting.append(deferral.Waiting(f.name, age, scan.grace_s, new=False))
        return None
    before, checks = sink.counts.copy(), sink.checks.copy()
    problem, cut = None, None
    try:
        with open_file(fs, f) as fh:
            tee = HashingReader(fh, facts.size)
            for pl in iter_records(suffix, io.BufferedReader(tee, 1 << 20), scan.max_record_bytes):
                if pl.truncated and waiting:
                    cut = pl  # always the last record: the file is deferred whole (below)
                    continue
                if pl.truncated and pl.record is None and pl.check == "truncated":
                    pl.error = (f"{pl.error}; last written {deferral.human(age)} ago, older than the grace of "
                                f"{deferral.human(scan.grace_s)}: its writer is taken to have stopped")
                sink.add(row_for(scan.batch_id, f.name, sha, pl))
            while tee.read(1 << 20):  # a parser may stop early (a CSV error at the end): hash the rest
                pass
        if tee.digest.hexdigest() != sha:
            problem = "it changed while it was read"
    except OSError as err:
        problem = str(err)
    if problem:
        log.warning("inbox file %r left for the next run: %s", f.name, problem)
        scan.listed[f.name] = None  # its state is unknown: a deferred row of it stays as it is
        sink.drop_file(scan.batch_id, sha, before, checks)
        return None
    if cut is not None:  # within the grace: one deferred row stands for the whole file state
        sink.drop_file(scan.batch_id, sha, before, checks)
        reason = deferral.deferred_reason(cut.line_no, (cut.error or "no line break after it").removeprefix("truncated: "), age,
                                          scan.grace_s)
        row = _row(scan.batch_id, f.name, sha, ParsedLine(0, b"", None), "deferred", deferral.CHECK, reason)
        sink.add({**row, "raw": None})  # no bytes consumed: the file is read again later
        scan.waiting.append(deferral.Waiting(f.name, age, scan.grace_s, new=True))
    scan.done.add(sha)  # the same content under two names in one scan counts once
    return {"file_sha": sha, "source": scan.inbox, "name": f.name, "size": facts.size,
            "status": "deferred" if cut is not None else "processed", "batch_id": scan.batch_id,
            "seen_at": known["seen_at"] if known else scan.now, "modified_at": modified}


def _scan_inbox(settings: Settings, scan: _Scan, only: list[str] | None = None) -> list[dict]:
    files: list[dict[str, Any]] = []
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
            if sha in scan.done:
                continue
            scan.done.add(sha)
            shown = repr(f.name)[:1000]
            pl = ParsedLine(0, f.name.encode("utf-8", "surrogateescape")[:1000], None, f.unsafe)
            scan.sink.add(_row(scan.batch_id, shown, sha, pl, "quarantined", "unsafe_path", f.unsafe))
            files.append({"file_sha": sha, "source": settings.inbox, "name": shown, "size": 0, "status": "processed",
                          "batch_id": scan.batch_id, "seen_at": scan.now, "modified_at": None})
            continue
        if (row := _scan_file(fs, f, scan)) is not None:
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
            sink.add(row_for(batch_id, safe_source, provisional, pl))
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
                  only: list[str] | None = None, max_record_bytes: int = MAX_RECORD_BYTES,
                  grace_s: float | None = None) -> BatchRef:
    """`only`: restrict to these inbox-relative file names (an urgent update names its files).
    `grace_s`: how long a file with a cut-off last record waits for its writer (None: the
    setting, see deferral.grace_s). Memory is bounded by `max_record_bytes` and CHUNK_ROWS,
    whatever the size of a file."""
    grace = deferral.grace_s(grace_s)
    engine = ledger.engine_for(settings.ledger_url)
    existing = ledger.batch_row(engine, batch_id)
    if existing is not None:
        log.info("batch %s already collected; returning it (retry)", batch_id)
        return BatchRef(batch_id=batch_id, **existing["counts"]["collect"])

    with engine.connect() as conn:
        done = {sha for (sha,) in conn.execute(
            sa.select(ledger.inbox_files.c.file_sha).where(ledger.inbox_files.c.status == "processed"))}
        known = deferral.known_deferred(conn, settings.inbox)
    with engine.begin() as conn:
        scan = _Scan(batch_id, settings.inbox, _Sink(conn), done, known, grace, ledger.utcnow(), max_record_bytes)
        files = _scan_inbox(settings, scan, only)
        mark = _scan_sql(sql_source, batch_id, scan.sink) if sql_source else None
        scan.sink.flush()
        counts = scan.sink.counts
        counts = {"files": len(files), "seen": sum(counts.values()), "collected": counts["collected"],
                  "quarantined": counts["quarantined"], "deferred": counts["deferred"]}
        for i in range(0, len(files), CHUNK_ROWS):
            part = files[i:i + CHUNK_ROWS]
            # a deferred state read again after its grace: its row is replaced, not duplicated
            conn.execute(sa.delete(ledger.inbox_files).where(
                ledger.inbox_files.c.file_sha.in_([f["file_sha"] for f in part])))
            conn.execute(sa.insert(ledger.inbox_files), part)
        deferral.supersede(conn, settings.inbox, scan.listed, complete=only is None)
        if mark:
            conn.execute(sa.delete(ledger.watermarks).where(ledger.watermarks.c.source == mark["source"]))
            conn.execute(sa.insert(ledger.watermarks), [mark])
        counts.update(deferred_files=len(scan.waiting), waiting=[w.to_dict() for w in scan.waiting[:WAITING_SHOWN]],
                      summary=deferral.summary(counts, scan.waiting, dict(scan.sink.checks)))
        conn.execute(sa.insert(ledger.batches), [{
            "batch_id": batch_id, "created_at": ledger.utcnow(), "status": "collected",
            "counts": json.dumps({"collect": counts}),
        }])
    log.info("collect_qa %s: %s", batch_id, counts["summary"])
    return BatchRef(batch_id=batch_id, **counts)
