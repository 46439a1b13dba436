"""validate_qa: a Great Expectations suite plus screening on a collected batch.

Row-level checks that GX expresses well (required fields, types, lengths, allowed values,
forbidden patterns) run as a GX Core 1.x suite on the batch's DataFrame, with
`result_format=COMPLETE` so every failing row index comes back. Checks that need state outside
the batch (duplicates against the corpus and against the frozen holdout/guard) are screening
in Python, each a hash-set lookup. A row failing anything is quarantined with the first failed
check as `check_name` and all failures in `reason`; its raw bytes stay in the ledger (the audit
store), while GX, its Data Docs, the logs and MLflow see only lengths, counts and check names.

A batch is validated CHUNK_ROWS records at a time (one GX run and one transaction per chunk, one
duplicate index across chunks), so memory does not grow with the batch's text. A retried task
returns the stored result; one that crashed mid-batch resumes after the last committed chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from shoefix_tasks.config import Settings
from shoefix_tasks.errors import PermanentError
from shoefix_tasks.intake.leak import ParaphraseIndex
from shoefix_tasks.intake.screening import NearDupIndex, minhash, screen_record
from shoefix_tasks.intake.suite import TEXT_BOUNDS, build_frame, build_suite, run_suite  # noqa: F401 (re-export)
from shoefix_tasks.records import load_eval_set, question_key, write_jsonl
from shoefix_tasks.store import ledger

log = logging.getLogger(__name__)

CHUNK_ROWS = 20_000  # records per GX run and per commit: ~100 MB of payloads at ~1 KB each


class QuarantineRateExceeded(PermanentError):
    """More of the batch was rejected than the configured threshold allows."""


@dataclass
class ValidationResult:
    batch_id: str
    seen: int
    accepted: int
    quarantined: int
    deferred: int
    quarantine_rate: float
    reasons: dict[str, int] = field(default_factory=dict)
    snapshot_hash: str | None = None
    snapshot_path: str | None = None
    snapshot_records: int = 0
    data_docs: str | None = None
    validate_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScreenState:
    """What duplicates are checked against. Earlier batches' accepted rows are the corpus; this
    batch's rows already decided (by an earlier chunk, or by a try that crashed after committing
    some chunks) are "in batch", so a resumed validation gives every row the same verdict."""

    corpus_hashes: set[str] = field(default_factory=set)
    corpus_index: NearDupIndex = field(default_factory=NearDupIndex)
    batch_hashes: set[str] = field(default_factory=set)
    batch_index: NearDupIndex = field(default_factory=NearDupIndex)

    @classmethod
    def load(cls, engine: sa.Engine, batch_id: str) -> ScreenState:
        state = cls()
        c, r = ledger.corpus.c, ledger.records.c
        with engine.connect() as conn:
            for h, payload, owner in conn.execute(sa.select(c.content_hash, c.payload, c.batch_id)):
                rec = json.loads(payload)
                text = rec["question"] + " " + rec["answer"]
                if owner == batch_id:
                    state.batch_hashes.add(h)
                    state.batch_index.add(rec["id"], text)
                else:
                    state.corpus_hashes.add(h)
                    state.corpus_index.add(rec["id"], text)
            state.batch_hashes.update(h for (h,) in conn.execute(sa.select(r.content_hash).where(
                r.batch_id == batch_id, r.status == "quarantined", r.content_hash.is_not(None))))
        return state


def _screen(payloads: list[dict[str, Any]], hashes: list[str | None], state: ScreenState,
            frozen: FrozenSets) -> dict[int, list[str]]:
    """Exact duplicates by hash-set lookup, near duplicates by MinHash LSH (and, for the frozen sets,
    question paraphrases by rarity-weighted term Jaccard), content screening.
    Updates `state` with the rows it sees, so consecutive chunks share one batch index."""
    failures: dict[int, list[str]] = {}
    for i, (p, h) in enumerate(zip(payloads, hashes, strict=True)):
        fails = screen_record(p)
        q, a = p.get("question"), p.get("answer")
        both = isinstance(q, str) and isinstance(a, str)
        sig = minhash(q + " " + a) if both else None  # one signature serves every Q+A lookup
        if isinstance(q, str):
            if question_key(q) in frozen.keys:
                fails.append("duplicate_of_holdout")
            elif (hit := frozen.index.query(q)) is not None or (
                    both and (hit := frozen.qa_index.query(q + " " + a, sig)) is not None):
                fails.append(f"near_duplicate_of_holdout({hit})")
            elif (para := frozen.paraphrase.query(q)) is not None:
                fails.append(f"near_duplicate_of_holdout({para[0]}, question paraphrase {para[1]:.2f})")
        if h is not None and both:
            text = q + " " + a
            if h in state.corpus_hashes:
                fails.append("duplicate_of_corpus")
            elif h in state.batch_hashes:
                fails.append("duplicate_in_batch")
            elif (hit := state.corpus_index.query(text, sig)) is not None:
                fails.append(f"near_duplicate_of_corpus({hit})")
            elif (hit := state.batch_index.query(text, sig)) is not None:
                fails.append(f"near_duplicate_in_batch({hit})")
            state.batch_hashes.add(h)
            if not fails:
                state.batch_index.add(str(p.get("id")), text, sig)
        if fails:
            failures[i] = fails
    return failures


@dataclass
class FrozenSets:
    keys: set[str]  # exact (normalized) holdout/guard questions
    index: NearDupIndex  # their questions (character 5-grams: copies and light edits)
    qa_index: NearDupIndex  # their questions with reference answers
    paraphrase: ParaphraseIndex  # their questions asked in other words (rarity-weighted terms, issue 12)


def frozen_sets(data_dir: Path) -> FrozenSets:
    rows = [r for kind in ("holdout", "guard") for r in load_eval_set(data_dir, kind)]
    return FrozenSets({question_key(r["question"]) for r in rows},
                      NearDupIndex.of((r["id"], r["question"]) for r in rows),
                      NearDupIndex.of((r["id"], r["question"] + " " + r["answer"]) for r in rows),
                      ParaphraseIndex(rows))


def write_snapshot(settings: Settings, engine: sa.Engine) -> tuple[str, Path, int]:
    """The accepted corpus as a content-hashed JSONL file (same content -> same name), streamed:
    the name is `rows_hash` of the corpus, computed from the stored content hashes in order."""
    c = ledger.corpus.c
    digest, n = hashlib.sha256(), 0
    with engine.connect() as conn:
        for (h,) in conn.execute(sa.select(c.content_hash).order_by(c.content_hash)):
            digest.update((h if n == 0 else "\n" + h).encode())
            n += 1
        path = settings.home / "snapshots" / f"{digest.hexdigest()}.jsonl"
        if not path.exists():
            rows = (json.loads(p) for (p,) in conn.execute(sa.select(c.payload).order_by(c.record_id, c.lang)))
            write_jsonl(path, rows)
    return digest.hexdigest(), path, n


def log_validation(settings: Settings, result: ValidationResult) -> str:
    """An MLflow `validate` run per batch: the counts, the reasons and the GX Data Docs (HTML)."""
    import mlflow

    from shoefix_tasks.store import tracking
    tracking.configure(settings)
    run_id = tracking.run_for("validate", result.batch_id, run_name="validate",
                              tags={"shoefix.snapshot": result.snapshot_hash or ""})
    client = mlflow.MlflowClient()
    tracking.log_metrics(client, run_id, {f"intake/{k}": getattr(result, k) for k in
                                          ("seen", "accepted", "quarantined", "deferred", "quarantine_rate",
                                           "snapshot_records")})
    client.log_dict(run_id, result.reasons, "quarantine_reasons.json")
    if result.data_docs:
        client.log_artifacts(run_id, str(Path(result.data_docs).parent), "data_docs")
        log.info("GX Data Docs for batch %s: %s (also in MLflow run %s, artifacts/data_docs/index.html)",
                 result.batch_id, result.data_docs, run_id)
    client.set_terminated(run_id)
    return run_id


def validate_batch(settings: Settings, batch_id: str, max_quarantine_rate: float = 0.5) -> ValidationResult:
    engine = ledger.engine_for(settings.ledger_url)
    batch = ledger.batch_row(engine, batch_id)
    if batch is None:
        raise LookupError(f"no collected batch {batch_id!r}: run collect_qa first")
    if batch["status"] == "validated":
        log.info("batch %s already validated; returning the stored result (retry)", batch_id)
        result = ValidationResult(**batch["counts"]["validate"])
    else:
        result = _validate_and_commit(settings, engine, batch_id, batch["counts"])
    log.info("validated batch %s: accepted=%d quarantined=%d deferred=%d of %d seen; reasons=%s",
             batch_id, result.accepted, result.quarantined, result.deferred, result.seen, result.reasons)
    if result.seen and result.quarantine_rate > max_quarantine_rate:
        raise QuarantineRateExceeded(
            f"batch {batch_id}: {result.quarantined}/{result.seen} records quarantined "
            f"({result.quarantine_rate:.0%} > {max_quarantine_rate:.0%}); reasons: {result.reasons}")
    return result


def _commit_chunk(engine: sa.Engine, batch_id: str, pending: list, payloads: list[dict[str, Any]],
                  failures: dict[int, list[str]]) -> None:
    """One chunk's verdicts in one transaction (executemany, not a statement per row)."""
    r = ledger.records.c
    quarantined, accepted, corpus_rows = [], [], []
    for i, (row_id, payload_json, chash) in enumerate(pending):
        if names := failures.get(i):
            quarantined.append({"rid": row_id, "st": "quarantined", "ck": names[0], "why": "; ".join(names),
                                "raw": payload_json.encode("utf-8")})
            continue
        p = payloads[i]
        accepted.append({"rid": row_id, "st": "accepted"})
        corpus_rows.append({
            "content_hash": chash, "question_key": question_key(p["question"]), "record_id": p["id"],
            "lang": p["lang"], "topic": p["topic"], "payload": payload_json, "batch_id": batch_id,
            "ledger_row": row_id,
        })
    where = r.row_id == sa.bindparam("rid")
    with engine.begin() as conn:
        if quarantined:
            conn.execute(sa.update(ledger.records).where(where).values(
                status=sa.bindparam("st"), check_name=sa.bindparam("ck"), reason=sa.bindparam("why"),
                raw=sa.bindparam("raw")), quarantined)
        if accepted:
            conn.execute(sa.update(ledger.records).where(where).values(status=sa.bindparam("st")), accepted)
            conn.execute(sa.insert(ledger.corpus), corpus_rows)


def _validate_and_commit(settings: Settings, engine: sa.Engine, batch_id: str, counts: dict[str, Any],
                         chunk: int | None = None) -> ValidationResult:
    """Validate the batch CHUNK_ROWS records at a time: memory stays bounded for a batch of
    millions, and each chunk commits on its own (a retry resumes after the last committed one)."""
    chunk = chunk or CHUNK_ROWS
    frozen = frozen_sets(settings.data_dir)
    state = ScreenState.load(engine, batch_id)
    r = ledger.records.c
    data_docs, last, part = None, -1, 0
    while True:
        with engine.connect() as conn:
            pending = conn.execute(
                sa.select(r.row_id, r.payload, r.content_hash)
                .where(r.batch_id == batch_id, r.status == "collected", r.row_id > last)
                .order_by(r.row_id).limit(chunk)).all()
        if not pending:
            break
        last = pending[-1][0]
        payloads = [json.loads(p) for _, p, _ in pending]
        failures: dict[int, list[str]] = {}
        suite_failures, data_docs = run_suite(build_frame(payloads), settings.home / "gx",
                                              batch_id if part == 0 else f"{batch_id} part {part + 1}")
        for i, names in suite_failures.items():
            failures.setdefault(i, []).extend(names)
        for i, names in _screen(payloads, [h for _, _, h in pending], state, frozen).items():
            failures.setdefault(i, []).extend(names)
        _commit_chunk(engine, batch_id, pending, payloads, failures)
        part += 1
        if part > 1:
            log.info("validated chunk %d of batch %s (%d records)", part, batch_id, len(pending))
    del state
    status = ledger.status_counts(engine, batch_id)
    seen = sum(status.values())
    digest, path, n = write_snapshot(settings, engine)
    # reasons are summarized by check name (the part before any "(...)" detail)
    result = ValidationResult(
        batch_id=batch_id, seen=seen, accepted=status.get("accepted", 0),
        quarantined=status.get("quarantined", 0), deferred=status.get("deferred", 0),
        quarantine_rate=round(status.get("quarantined", 0) / seen, 4) if seen else 0.0,
        reasons=ledger.quarantine_reasons(engine, batch_id),
        snapshot_hash=digest, snapshot_path=str(path), snapshot_records=n, data_docs=data_docs,
    )
    result.validate_run_id = log_validation(settings, result)
    assert result.accepted + result.quarantined + result.deferred == result.seen, "ledger does not reconcile"
    with engine.begin() as conn:
        conn.execute(sa.update(ledger.batches).where(ledger.batches.c.batch_id == batch_id).values(
            status="validated", snapshot_hash=digest,
            counts=json.dumps({**counts, "validate": result.to_dict()})))
    return result
