"""validate_qa: a Great Expectations suite plus screening on a collected batch.

Row-level checks that GX expresses well (required fields, types, lengths, allowed values,
forbidden patterns) run as a GX Core 1.x suite on the batch's DataFrame, with
`result_format=COMPLETE` so every failing row index comes back. Checks that need state outside
the batch (duplicates against the corpus and against the frozen holdout/guard) are screening
in Python, each a hash-set lookup. A row failing anything is quarantined with the first failed
check as `check_name` and all failures in `reason`; its raw bytes stay in the ledger.

Everything commits in one transaction; a retried task returns the stored result.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from shoefix_tasks import ledger
from shoefix_tasks.config import LANGS, TOPICS, Settings
from shoefix_tasks.records import load_eval_set, normalize_text, question_key, rows_hash, write_jsonl

log = logging.getLogger(__name__)

TEXT_BOUNDS = {"question": (8, 600), "answer": (40, 4000)}  # characters


class QuarantineRateExceeded(RuntimeError):
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_frame(payloads: list[dict[str, Any]]):
    """The batch as a DataFrame, plus `<field>_ok` type columns so GX can check types row by row."""
    import pandas as pd

    cols = {}
    for name in ("id", "question", "answer", "topic", "lang"):
        values = [p.get(name) for p in payloads]
        cols[f"{name}_ok"] = [isinstance(v, str) and bool(v.strip()) for v in values]
        # non-strings become None so length/set expectations see a clean string column
        cols[name] = [v if isinstance(v, str) else None for v in values]
    return pd.DataFrame(cols)


def build_suite():
    """The intake suite, as code. Kept small and explicit: each expectation is a quarantine reason."""
    import great_expectations as gx

    e = gx.expectations
    suite = gx.ExpectationSuite(name="shoefix_qa_intake")
    for name in ("id", "question", "answer", "topic", "lang"):
        suite.add_expectation(e.ExpectColumnValuesToBeInSet(column=f"{name}_ok", value_set=[True]))
    for name, (lo, hi) in TEXT_BOUNDS.items():
        suite.add_expectation(e.ExpectColumnValueLengthsToBeBetween(column=name, min_value=lo, max_value=hi))
    suite.add_expectation(e.ExpectColumnValuesToBeInSet(column="topic", value_set=list(TOPICS)))
    suite.add_expectation(e.ExpectColumnValuesToBeInSet(column="lang", value_set=list(LANGS)))
    return suite


def run_suite(frame) -> dict[int, list[str]]:
    """Run the suite; map row index -> failed check names (empty when the row passes)."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas("inbox").add_dataframe_asset("batch")
    batch_def = asset.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add(build_suite())
    result = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(suite, result_format="COMPLETE")
    failures: dict[int, list[str]] = {}
    for er in result.results:
        cfg = er.expectation_config
        name = f"gx:{cfg.type}({cfg.kwargs.get('column')})"
        for idx in er.result.get("unexpected_index_list") or []:
            failures.setdefault(int(idx), []).append(name)
    return failures


def _screen(payloads: list[dict[str, Any]], hashes: list[str | None], corpus_hashes: set[str],
            frozen_questions: set[str]) -> dict[int, list[str]]:
    failures: dict[int, list[str]] = {}
    seen_in_batch: set[str] = set()
    for i, (p, h) in enumerate(zip(payloads, hashes, strict=True)):
        q = p.get("question")
        if isinstance(q, str) and question_key(q) in frozen_questions:
            failures.setdefault(i, []).append("duplicate_of_holdout")
        if h is None:
            continue
        if h in corpus_hashes:
            failures.setdefault(i, []).append("duplicate_of_corpus")
        elif h in seen_in_batch:
            failures.setdefault(i, []).append("duplicate_in_batch")
        seen_in_batch.add(h)
    return failures


def frozen_question_keys(data_dir: Path) -> set[str]:
    return {question_key(r["question"]) for kind in ("holdout", "guard") for r in load_eval_set(data_dir, kind)}


def write_snapshot(settings: Settings, engine: sa.Engine) -> tuple[str, Path, int]:
    """The accepted corpus as a content-hashed JSONL file (same content -> same name)."""
    rows = ledger.corpus_rows(engine)
    digest = rows_hash(rows)
    path = settings.home / "snapshots" / f"{digest}.jsonl"
    if not path.exists():
        write_jsonl(path, sorted(rows, key=lambda r: (r["id"], r["lang"])))
    return digest, path, len(rows)


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


def _validate_and_commit(settings: Settings, engine: sa.Engine, batch_id: str,
                         counts: dict[str, Any]) -> ValidationResult:
    with engine.connect() as conn:
        pending = conn.execute(
            sa.select(ledger.records.c.row_id, ledger.records.c.payload, ledger.records.c.content_hash)
            .where(ledger.records.c.batch_id == batch_id, ledger.records.c.status == "collected")
            .order_by(ledger.records.c.row_id)).all()
        corpus_hashes = {h for (h,) in conn.execute(sa.select(ledger.corpus.c.content_hash))}
    payloads = [json.loads(p) for _, p, _ in pending]
    hashes = [h for _, _, h in pending]
    failures: dict[int, list[str]] = {}
    if payloads:
        for i, names in run_suite(build_frame(payloads)).items():
            failures.setdefault(i, []).extend(names)
        for i, names in _screen(payloads, hashes, corpus_hashes, frozen_question_keys(settings.data_dir)).items():
            failures.setdefault(i, []).extend(names)

    accepted_rows = []
    with engine.begin() as conn:
        for i, (row_id, payload_json, chash) in enumerate(pending):
            names = failures.get(i)
            if names:
                conn.execute(sa.update(ledger.records).where(ledger.records.c.row_id == row_id).values(
                    status="quarantined", check_name=names[0], reason="; ".join(names),
                    raw=payload_json.encode("utf-8")))
                continue
            p = payloads[i]
            conn.execute(sa.update(ledger.records).where(ledger.records.c.row_id == row_id).values(status="accepted"))
            accepted_rows.append({
                "content_hash": chash, "question_key": question_key(p["question"]), "record_id": p["id"],
                "lang": p["lang"], "topic": p["topic"], "payload": payload_json, "batch_id": batch_id,
                "ledger_row": row_id,
            })
        if accepted_rows:
            conn.execute(sa.insert(ledger.corpus), accepted_rows)
    status = ledger.status_counts(engine, batch_id)
    seen = sum(status.values())
    digest, path, n = write_snapshot(settings, engine)
    result = ValidationResult(
        batch_id=batch_id, seen=seen, accepted=status.get("accepted", 0),
        quarantined=status.get("quarantined", 0), deferred=status.get("deferred", 0),
        quarantine_rate=round(status.get("quarantined", 0) / seen, 4) if seen else 0.0,
        reasons=ledger.quarantine_reasons(engine, batch_id),
        snapshot_hash=digest, snapshot_path=str(path), snapshot_records=n,
    )
    assert result.accepted + result.quarantined + result.deferred == result.seen, "ledger does not reconcile"
    with engine.begin() as conn:
        conn.execute(sa.update(ledger.batches).where(ledger.batches.c.batch_id == batch_id).values(
            status="validated", snapshot_hash=digest,
            counts=json.dumps({**counts, "validate": result.to_dict()})))
    return result


def normalized_questions(rows: list[dict[str, Any]]) -> set[str]:
    return {normalize_text(r["question"]) for r in rows}
