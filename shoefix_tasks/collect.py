"""collect_qa: read what is new in the inbox into a ledgered batch.

Inbox files are never modified or deleted. A file is identified by its content hash: one already
processed is skipped, so the same file copied twice or re-run is never counted twice. A file whose
last line is truncated (still being written) is *deferred*: all its lines are ledgered as
deferred and the file is picked up again once it is complete (its hash then differs).

The whole batch (ledger rows + files marked processed + the batch row) commits in one
transaction; a retried task finds the batch already there and returns it unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from shoefix_tasks import ledger
from shoefix_tasks.config import Settings
from shoefix_tasks.records import content_hash, file_sha256

log = logging.getLogger(__name__)
SUFFIXES = (".jsonl",)


@dataclass
class ParsedLine:
    line_no: int
    raw: bytes
    record: dict[str, Any] | None  # None when the line did not parse
    error: str | None = None


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


def parse_jsonl_bytes(data: bytes) -> tuple[list[ParsedLine], bool]:
    """Split into lines and parse each. Returns (lines, truncated).

    `truncated` is True when the data does not end in a newline and its last line is not a
    complete JSON object: the writer has not finished the file yet.
    """
    chunks = data.split(b"\n")
    ends_clean = data.endswith(b"\n") or not data
    if ends_clean and chunks and chunks[-1] == b"":
        chunks.pop()
    out: list[ParsedLine] = []
    for i, raw in enumerate(chunks, start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            out.append(ParsedLine(i, raw, None, f"malformed UTF-8 at byte {err.start}"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            out.append(ParsedLine(i, raw, None, f"invalid JSON: {err.msg} (col {err.colno})"))
            continue
        if not isinstance(obj, dict):
            out.append(ParsedLine(i, raw, None, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        out.append(ParsedLine(i, raw, obj))
    truncated = not ends_clean and bool(out) and out[-1].record is None
    return out, truncated


def list_inbox(inbox: Path) -> list[Path]:
    if not inbox.is_dir():
        raise FileNotFoundError(f"inbox folder {inbox} does not exist")
    return sorted(p for p in inbox.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def collect_batch(settings: Settings, batch_id: str) -> BatchRef:
    engine = ledger.engine_for(settings.ledger_url)
    existing = ledger.batch_row(engine, batch_id)
    if existing is not None:
        log.info("batch %s already collected; returning it (retry)", batch_id)
        return BatchRef(batch_id=batch_id, **existing["counts"]["collect"])

    inbox = Path(settings.inbox)
    with engine.connect() as conn:
        done = {sha for (sha,) in conn.execute(
            sa.select(ledger.inbox_files.c.file_sha).where(ledger.inbox_files.c.status == "processed"))}
    rows: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    now = ledger.utcnow()
    for path in list_inbox(inbox):
        sha = file_sha256(path)
        if sha in done:
            continue
        done.add(sha)  # the same content under two names in one scan counts once
        data = path.read_bytes()
        lines, truncated = parse_jsonl_bytes(data)
        name = str(path.relative_to(inbox))
        for pl in lines:
            status, check, reason = "collected", None, None
            if truncated:
                status, check, reason = "deferred", "truncated_file", "file still being written (truncated last line)"
            elif pl.record is None:
                status, check, reason = "quarantined", "parse", pl.error
            rec = pl.record or {}
            q, a = rec.get("question"), rec.get("answer")
            chash = content_hash(q, a) if isinstance(q, str) and isinstance(a, str) else None
            rows.append({
                "batch_id": batch_id, "source": name, "file_sha": sha, "line_no": pl.line_no,
                "content_hash": chash, "record_id": str(rec.get("id")) if rec.get("id") is not None else None,
                "status": status, "check_name": check, "reason": reason,
                "payload": json.dumps(pl.record, ensure_ascii=False) if pl.record is not None else None,
                "raw": pl.raw if status != "collected" else None,
            })
        files.append({"file_sha": sha, "source": str(inbox), "name": name, "size": len(data),
                      "status": "deferred" if truncated else "processed", "batch_id": batch_id, "seen_at": now})

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
            # a deferred file may be seen again (same hash, still incomplete): update, don't duplicate
            conn.execute(sa.delete(ledger.inbox_files).where(ledger.inbox_files.c.file_sha == f["file_sha"]))
            conn.execute(sa.insert(ledger.inbox_files), [f])
        conn.execute(sa.insert(ledger.batches), [{
            "batch_id": batch_id, "created_at": now, "status": "collected",
            "counts": json.dumps({"collect": counts}),
        }])
    log.info("collected batch %s: %s", batch_id, counts)
    return BatchRef(batch_id=batch_id, **counts)
