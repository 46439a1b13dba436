"""collect_qa + validate_qa on real files, a real SQLite ledger and the real GX suite."""

from __future__ import annotations

import json

import pytest

from shoefix_tasks import ledger
from shoefix_tasks.collect import collect_batch
from shoefix_tasks.formats import parse_jsonl as parse_jsonl_bytes
from shoefix_tasks.validate import QuarantineRateExceeded, validate_batch
from tests.conftest import FIXTURES, copy_fixture_corpus

FIXTURE_ROWS = [json.loads(x) for x in (FIXTURES / "corpus_small.jsonl").read_text().splitlines()]


def good(i: int, **kw) -> dict:
    """A valid record, distinct from every other `good(j)` (taken from the fixture corpus)."""
    base = FIXTURE_ROWS[i % len(FIXTURE_ROWS)]
    rec = {k: base[k] for k in ("question", "answer", "topic", "lang")}
    rec["id"] = f"t-{i}"
    rec.update(kw)
    return rec


def write(settings, name: str, rows: list, raw: bytes = b"") -> None:
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows) + raw
    (settings.home / "inbox" / name).write_bytes(data)


def test_parse_handles_bad_lines_and_truncation():
    lines, truncated = parse_jsonl_bytes(b'{"a": 1}\n\xff\xfe\n[1]\n{"b": \n')
    assert [(pl.line_no, pl.record is not None) for pl in lines] == [(1, True), (2, False), (3, False), (4, False)]
    assert "UTF-8" in lines[1].error and "object" in lines[2].error and not truncated
    _, truncated = parse_jsonl_bytes(b'{"a": 1}\n{"b": 2, "c"')
    assert truncated


def test_ledger_reconciles_and_good_rows_proceed(shoefix_env):
    s = shoefix_env
    rows = [good(1), good(2), good(3, topic="astrology"), good(4, answer="  "), good(5, question=42),
            good(1)]  # the last is an exact duplicate of the first
    write(s, "a.jsonl", rows, raw=b"not json\n")
    ref = collect_batch(s, "run-1")
    assert ref.seen == 7 and ref.quarantined == 1 and ref.collected == 6
    res = validate_batch(s, "run-1", max_quarantine_rate=0.9)
    assert res.accepted + res.quarantined + res.deferred == res.seen == 7
    assert res.accepted == 2
    assert res.reasons["duplicate_in_batch"] == 1 and res.reasons["parse"] == 1
    assert res.snapshot_records == 2
    # GX Data Docs are built for the validation and logged to the batch's MLflow `validate` run
    assert res.data_docs and __import__("pathlib").Path(res.data_docs).is_file() and res.validate_run_id
    # every quarantined row keeps its raw bytes and a reason
    engine = ledger.engine_for(s.ledger_url)
    with engine.connect() as conn:
        q = conn.execute(ledger.records.select().where(ledger.records.c.status == "quarantined")).mappings().all()
    assert all(r["raw"] and r["reason"] for r in q)
    assert any("expect_column_values_to_be_in_set(topic)" in r["reason"] for r in q)


def test_rerun_is_idempotent_and_nothing_new_is_empty(shoefix_env):
    s = shoefix_env
    copy_fixture_corpus(s)
    first = collect_batch(s, "run-1")
    assert collect_batch(s, "run-1") == first  # retry of the same task
    v1 = validate_batch(s, "run-1")
    assert validate_batch(s, "run-1") == v1
    copy_fixture_corpus(s, name="copy-of-same.jsonl")  # same content under another name
    assert collect_batch(s, "run-2").seen == 0


def test_truncated_file_is_deferred_then_collected(shoefix_env):
    s = shoefix_env
    write(s, "b.jsonl", [good(1)], raw=b'{"id": "t-2", "question": "half')
    ref = collect_batch(s, "run-1")
    assert ref.deferred == 2 and ref.collected == 0
    write(s, "b.jsonl", [good(1), good(2)])  # the writer finished
    ref2 = collect_batch(s, "run-2")
    assert ref2.collected == 2
    assert validate_batch(s, "run-2").accepted == 2


def test_duplicates_of_corpus_and_holdout_are_quarantined(shoefix_env):
    s = shoefix_env
    write(s, "a.jsonl", [good(1)])
    collect_batch(s, "run-1")
    validate_batch(s, "run-1")
    holdout_q = json.loads((FIXTURES / "data" / "holdout" / "fx.jsonl").read_text().splitlines()[0])["question"]
    write(s, "b.jsonl", [good(1, question=good(1)["question"].upper()), good(7, question=holdout_q)])
    collect_batch(s, "run-2")
    res = validate_batch(s, "run-2", max_quarantine_rate=1.0)
    assert res.accepted == 0 and res.reasons == {"duplicate_of_corpus": 1, "duplicate_of_holdout": 1}


def test_quarantine_rate_fails_loudly_after_recording(shoefix_env):
    s = shoefix_env
    write(s, "a.jsonl", [good(1, topic="x"), good(2, topic="y"), good(3)])
    collect_batch(s, "run-1")
    with pytest.raises(QuarantineRateExceeded, match="2/3"):
        validate_batch(s, "run-1", max_quarantine_rate=0.5)
    counts = ledger.status_counts(ledger.engine_for(s.ledger_url), "run-1")
    assert counts == {"accepted": 1, "quarantined": 2}  # recorded, nothing lost
