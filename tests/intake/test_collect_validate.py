"""collect_qa + validate_qa on real files, a real SQLite ledger and the real GX suite."""

from __future__ import annotations

import json

import pytest

from shoefix_tasks.intake.collect import collect_batch
from shoefix_tasks.intake.formats import parse_jsonl as parse_jsonl_bytes
from shoefix_tasks.intake.validate import QuarantineRateExceeded, validate_batch
from shoefix_tasks.store import ledger
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
    assert ref.deferred == 1 and ref.collected == 0  # one ledger row for the file state, not one per record
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


def test_parsers_stream_with_memory_bounded_by_the_record_not_the_file(tmp_path):
    """20 MB of JSONL, CSV and Markdown, plus a 6 MB single line: traced Python allocations stay
    under 6 MB while every record is parsed (reading a file whole would need 20 MB at once)."""
    import io
    import tracemalloc

    from shoefix_tasks.intake.formats import inspect_stream, iter_records

    rec = good(1)
    bodies = {
        ".jsonl": (json.dumps(rec) + "\n").encode(),
        ".csv": ('t-1,"' + rec["question"] + '","' + rec["answer"].replace(". ", ".\r\n") + '",odor,en\r\n').encode(),
        ".md": f"Q: {rec['question']}\nA: {rec['answer']}\ntopic: odor\nlang: en\n---\n".encode(),
    }
    header = {".csv": b"id,question,answer,topic,lang\r\n"}
    for suffix, body in bodies.items():
        n = 20_000_000 // len(body)
        path = tmp_path / f"big{suffix}"
        with open(path, "wb") as fh:
            fh.write(header.get(suffix, b""))
            for _ in range(n // 2):
                fh.write(body)
            fh.write(b"x" * 6_000_000 + (b"\n---\n" if suffix == ".md" else b"\n"))  # one oversize record
            for _ in range(n - n // 2):
                fh.write(body)
        tracemalloc.start()
        with open(path, "rb") as fh:
            facts = inspect_stream(fh)
        with open(path, "rb") as fh:
            parsed = errors = 0
            for pl in iter_records(suffix, io.BufferedReader(fh, 1 << 20)):
                parsed += pl.record is not None
                errors += pl.record is None
                assert len(pl.raw) <= 1 << 20 and not pl.truncated
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert facts.size == path.stat().st_size
        assert parsed == n and errors == 1, suffix
        assert peak < 6_000_000, f"{suffix}: peak {peak:,} bytes"


def test_oversize_record_is_quarantined_with_a_bounded_raw_prefix(shoefix_env):
    s = shoefix_env
    write(s, "a.jsonl", [good(1), good(2, answer="mold " * 300_000), good(3)])
    ref = collect_batch(s, "run-1", max_record_bytes=100_000)
    assert ref.seen == 3 and ref.quarantined == 1 and ref.collected == 2
    with ledger.engine_for(s.ledger_url).connect() as conn:
        row = conn.execute(ledger.records.select().where(ledger.records.c.check_name == "oversize")).mappings().one()
    assert row["line_no"] == 2 and "exceeds the 100,000-byte limit" in row["reason"]
    assert len(row["raw"]) == 64 << 10 and row["raw"].startswith(b'{"question"')


def test_collect_inserts_in_chunks_and_a_file_changed_while_read_is_left_for_the_next_run(shoefix_env, monkeypatch):
    from shoefix_tasks.intake import collect
    s = shoefix_env
    monkeypatch.setattr(collect, "CHUNK_ROWS", 3)
    write(s, "a.jsonl", [good(i) for i in range(10)])
    write(s, "b.jsonl", [good(20 + i) for i in range(4)])
    real_open = collect.open_file
    opened: list[str] = []

    def rewrite_b_between_passes(fs, f):
        opened.append(f.name)
        if f.name == "b.jsonl" and opened.count("b.jsonl") == 2:  # the parse pass sees other bytes
            write(s, "b.jsonl", [good(30 + i) for i in range(4)])
        return real_open(fs, f)

    monkeypatch.setattr(collect, "open_file", rewrite_b_between_passes)
    ref = collect_batch(s, "run-1")
    assert (ref.files, ref.seen, ref.collected) == (1, 10, 10)  # b's rows were taken out again
    assert ledger.status_counts(ledger.engine_for(s.ledger_url), "run-1") == {"collected": 10}
    ref2 = collect_batch(s, "run-2")  # b, now stable, is read by the next run
    assert (ref2.files, ref2.collected) == (1, 4)


def test_chunked_validation_resumes_after_a_crash_with_the_same_verdicts(shoefix_env, monkeypatch, tmp_path):
    from shoefix_tasks.intake import validate
    from shoefix_tasks.records import rows_hash

    s = shoefix_env
    rows = [good(i) for i in range(8)] + [good(1, id="dup"), good(2, topic="astrology"),
                                          good(3, id="near", answer=good(3)["answer"] + " Thanks.")]
    write(s, "a.jsonl", rows)
    collect_batch(s, "run-1")
    reference = validate_batch(s, "run-1", max_quarantine_rate=1.0)  # one chunk

    # the same inbox in a fresh state folder, validated 2 records at a time, crashing after 3 chunks
    monkeypatch.setenv("SHOEFIX_HOME", str(tmp_path / "other"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other/mlflow.db")
    from shoefix_tasks.config import Settings

    s2 = Settings.from_env()
    (s2.home / "inbox").mkdir(parents=True)
    write(s2, "a.jsonl", rows)
    collect_batch(s2, "run-1")
    monkeypatch.setattr(validate, "CHUNK_ROWS", 2)
    real_commit, calls = validate._commit_chunk, []

    def crash_on_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("worker killed")
        real_commit(*args)

    monkeypatch.setattr(validate, "_commit_chunk", crash_on_fourth)
    with pytest.raises(RuntimeError, match="killed"):
        validate_batch(s2, "run-1", max_quarantine_rate=1.0)
    assert ledger.status_counts(ledger.engine_for(s2.ledger_url), "run-1")["collected"] == 5  # 3 chunks committed
    resumed = validate_batch(s2, "run-1", max_quarantine_rate=1.0)
    assert (resumed.accepted, resumed.quarantined, resumed.reasons) == \
        (reference.accepted, reference.quarantined, reference.reasons)
    assert reference.reasons == {"duplicate_in_batch": 1, "gx:expect_column_values_to_be_in_set": 1,
                                 "near_duplicate_in_batch": 1}
    assert resumed.snapshot_hash == reference.snapshot_hash
    assert reference.snapshot_hash == rows_hash(ledger.corpus_rows(ledger.engine_for(s.ledger_url)))
