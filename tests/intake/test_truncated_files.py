"""A file whose last record is cut off (a writer still writing, or one that died): deferred for a
grace period with one ledger row per file state, then processed with only the cut-off tail
quarantined; and every run says exactly what it did. Real files (their mtime is the grace
clock), the real SQLite ledger and the real GX suite."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import sqlalchemy as sa

from shoefix_tasks.intake.collect import collect_batch
from shoefix_tasks.intake.validate import validate_batch
from shoefix_tasks.store import ledger
from tests.conftest import FIXTURES

ROWS = [json.loads(x) for x in (FIXTURES / "corpus_small.jsonl").read_text().splitlines()]
TAIL = b'{"id": "w-3", "question": "How long should wet leather boots'  # the writer stopped here


def rec(i: int) -> dict:
    return {k: ROWS[i][k] for k in ("id", "question", "answer", "topic", "lang")}


def jsonl(*rows: dict) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def put(s, name: str, data: bytes, age_s: float = 0.0):
    path = s.home / "inbox" / name
    path.write_bytes(data)
    if age_s:
        when = time.time() - age_s
        os.utime(path, (when, when))
    return path


def ledger_rows(s, name: str) -> list:
    r = ledger.records
    with ledger.engine_for(s.ledger_url).connect() as conn:
        return conn.execute(sa.select(r).where(r.c.source == name).order_by(r.c.row_id)).all()


def file_states(s, name: str) -> list[tuple[str, str]]:
    f = ledger.inbox_files
    with ledger.engine_for(s.ledger_url).connect() as conn:
        return [tuple(x) for x in conn.execute(sa.select(f.c.status, f.c.batch_id).where(f.c.name == name)
                                               .order_by(f.c.seen_at))]


def test_cut_off_file_waits_once_per_state_then_only_its_tail_is_quarantined(shoefix_env, monkeypatch):
    s = shoefix_env
    monkeypatch.delenv("SHOEFIX_TRUNCATED_GRACE_S", raising=False)  # the default: one hour
    path = put(s, "w.jsonl", jsonl(rec(1), rec(2)) + TAIL)
    first = collect_batch(s, "run-1")
    assert (first.seen, first.collected, first.quarantined, first.deferred) == (1, 0, 0, 1)
    assert [(r.status, r.line_no, r.check_name, r.raw) for r in ledger_rows(s, "w.jsonl")] == [
        ("deferred", 0, "truncated_file", None)]  # one row stands for the file state; no byte consumed yet
    for key in ("run-2", "run-3"):  # the same state read again within the grace: nothing added
        again = collect_batch(s, key)
        assert (again.seen, again.files, again.deferred) == (0, 0, 0)
        assert again.summary.startswith("nothing new: 1 file deferred (w.jsonl: truncated, ")
    assert len(ledger_rows(s, "w.jsonl")) == 1 and file_states(s, "w.jsonl") == [("deferred", "run-1")]

    old = time.time() - 2 * 3600  # the writer died two hours ago: past the grace
    os.utime(path, (old, old))
    late = collect_batch(s, "run-4")
    assert (late.collected, late.quarantined, late.deferred) == (2, 1, 0)
    res = validate_batch(s, "run-4")
    assert res.accepted == 2 and res.reasons == {"truncated": 1}
    rows = [r for r in ledger_rows(s, "w.jsonl") if r.batch_id == "run-4"]
    assert [r.line_no for r in rows] == [1, 2, 3]  # every record once, none twice
    assert [json.loads(r.payload) for r in rows[:2]] == [rec(1), rec(2)]
    tail = rows[2]
    assert (tail.status, tail.check_name, tail.raw) == ("quarantined", "truncated", TAIL)
    assert tail.reason.startswith("truncated: last line has no newline") and "2 h ago" in tail.reason
    assert file_states(s, "w.jsonl") == [("processed", "run-4")]
    done = collect_batch(s, "run-5")
    assert done.seen == 0 and done.summary == "nothing new: no new or changed inbox files since the last run"


def test_grace_comes_from_the_setting_and_a_bad_value_is_a_clear_error(shoefix_env, monkeypatch):
    s = shoefix_env
    monkeypatch.setenv("SHOEFIX_TRUNCATED_GRACE_S", "60")
    put(s, "w.jsonl", jsonl(rec(1)) + TAIL, age_s=300)  # five minutes old, grace one minute
    ref = collect_batch(s, "run-1")
    assert (ref.collected, ref.quarantined, ref.deferred) == (1, 1, 0)
    monkeypatch.setenv("SHOEFIX_TRUNCATED_GRACE_S", "an hour")
    with pytest.raises(ValueError, match="SHOEFIX_TRUNCATED_GRACE_S must be a number of seconds"):
        collect_batch(s, "run-2")


def test_csv_cut_inside_a_quoted_field_is_deferred_then_its_tail_quarantined(shoefix_env, monkeypatch):
    """Even with a newline at the end: the file ends inside an open quote (an answer cut mid-line)."""
    monkeypatch.delenv("SHOEFIX_TRUNCATED_GRACE_S", raising=False)
    s = shoefix_env
    r = rec(4)
    complete = (f'id,question,answer,topic,lang\r\nc-1,"{r["question"]}","{r["answer"]}",odor,en\r\n').encode()
    cut = f'c-2,"{ROWS[5]["question"]}","Dry them\n'.encode()
    path = put(s, "w.csv", complete + cut)
    assert collect_batch(s, "run-1").deferred == 1
    old = time.time() - 3 * 3600
    os.utime(path, (old, old))
    ref = collect_batch(s, "run-2")
    assert (ref.collected, ref.quarantined) == (1, 1)
    tail = [x for x in ledger_rows(s, "w.csv") if x.status == "quarantined"]
    assert [(x.line_no, x.check_name, x.raw) for x in tail] == [(2, "truncated", cut.rstrip(b"\n"))]


def test_csv_last_row_without_a_line_break_waits_even_when_it_parses(shoefix_env):
    """A row cut at a cell boundary or mid-word still has all its cells: it waits like any cut-off
    record; once its writer is taken to have stopped it is judged as it stands: a row that fits its
    header is collected, one with a cell too many is quarantined as such (not as `truncated`)."""
    s = shoefix_env
    r = rec(4)
    head = f'id,question,answer,topic,lang\r\nc-1,"{r["question"]}","{r["answer"]}",odor,en\r\n'.encode()
    cut = f'c-2,"{ROWS[5]["question"]}",Dry them at room tem,odor,en'.encode()  # all five cells, no line break
    wide = f'c-3,"{ROWS[6]["question"]}","{ROWS[6]["answer"]}",odor,en,alice'.encode()
    a, b = put(s, "cut.csv", head + cut), put(s, "wide.csv", head.replace(b"c-1", b"c-9") + wide)
    ref = collect_batch(s, "run-1")
    assert (ref.collected, ref.deferred) == (0, 2)  # nothing of either file yet, not even the complete rows
    for path in (a, b):
        old = time.time() - 3 * 3600
        os.utime(path, (old, old))
    ref = collect_batch(s, "run-2")
    assert (ref.collected, ref.quarantined, ref.deferred) == (3, 1, 0)
    assert [(x.line_no, x.status) for x in ledger_rows(s, "cut.csv")] == [(0, "deferred"), (1, "collected"),
                                                                        (2, "collected")]
    bad = [(x.line_no, x.check_name, x.raw) for x in ledger_rows(s, "wide.csv") if x.status == "quarantined"]
    assert bad == [(2, "malformed_csv_row", wide)]


def test_markdown_last_block_without_a_line_break_waits(shoefix_env):
    """A Markdown block needs no closing `---`: a last line with no line break may be half written.
    Read now, the half answer would enter the corpus and the finished one later look like its
    near-duplicate; so the file waits, and once its writer is taken to have stopped the block is
    judged as it stands."""
    s = shoefix_env
    r, q = rec(4), ROWS[5]["question"]
    text = (f"id: md-1\ntopic: odor\nlang: en\nQ: {r['question']}\nA: {r['answer']}\n---\n"
            f"id: md-2\ntopic: odor\nlang: en\nQ: {q}\nA: Dry them at room tem")
    path = put(s, "notes.md", text.encode())
    assert (collect_batch(s, "run-1").collected, file_states(s, "notes.md")) == (0, [("deferred", "run-1")])
    path.write_bytes((text + "perature, away from heaters.\n").encode())  # finished
    ref = collect_batch(s, "run-2")
    assert (ref.collected, ref.deferred) == (2, 0)
    assert validate_batch(s, "run-2", max_quarantine_rate=1.0).reasons == {}
    answers = [x["answer"] for x in ledger.corpus_rows(ledger.engine_for(s.ledger_url))]
    assert len(answers) == 2 and any(a.endswith("away from heaters.") for a in answers), answers
    assert not any(a.endswith("room tem") for a in answers)  # the half answer never entered the corpus


def test_a_future_mtime_does_not_keep_a_file_waiting(shoefix_env):
    """A file stamped far ahead of our clock (an extracted archive, a skewed NFS server) is aged from
    the run that first saw it, not from its stamp; a stamp a little ahead is believed (age 0)."""
    from datetime import UTC, datetime, timedelta

    from shoefix_tasks.intake import deferral

    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    seen = now - timedelta(hours=3)
    assert deferral.age_s(now, now + timedelta(days=365 * 70), seen) == 3 * 3600
    assert deferral.age_s(now, now + timedelta(seconds=60), seen) == 0.0
    s = shoefix_env
    path = put(s, "ahead.jsonl", jsonl(rec(1)) + TAIL)
    ahead = time.time() + 70 * 365 * 86400
    os.utime(path, (ahead, ahead))
    assert collect_batch(s, "run-1").deferred == 1  # first seen now: within the grace
    f = ledger.inbox_files
    with ledger.engine_for(s.ledger_url).begin() as conn:  # ... and that was three hours ago
        conn.execute(sa.update(f).where(f.c.name == "ahead.jsonl")
                     .values(seen_at=datetime.now(UTC) - timedelta(hours=3)))
    ref = collect_batch(s, "run-2")
    assert (ref.collected, ref.quarantined, ref.deferred) == (1, 1, 0)


def test_a_file_that_changes_is_a_new_state_and_the_old_one_is_superseded(shoefix_env):
    s = shoefix_env
    put(s, "w.jsonl", jsonl(rec(1)) + TAIL)
    put(s, "gone.jsonl", TAIL)
    collect_batch(s, "run-1")
    put(s, "w.jsonl", jsonl(rec(1), rec(2)) + TAIL)  # the writer goes on: another state, deferred anew
    (s.home / "inbox" / "gone.jsonl").unlink()  # its writer gave up and removed it
    assert collect_batch(s, "run-2").deferred == 1
    assert file_states(s, "w.jsonl") == [("superseded", "run-1"), ("deferred", "run-2")]
    assert file_states(s, "gone.jsonl") == [("superseded", "run-1")]
    put(s, "w.jsonl", jsonl(rec(1), rec(2), rec(3)))  # finished
    ref = collect_batch(s, "run-3")
    assert (ref.collected, ref.quarantined, ref.deferred) == (3, 0, 0)
    assert [st for st, _ in file_states(s, "w.jsonl")] == ["superseded", "superseded", "processed"]


def test_every_run_says_what_it_did(shoefix_env, monkeypatch, caplog):
    """No 'nothing new' while something was collected, and a deferred file is named with its age."""
    monkeypatch.delenv("SHOEFIX_TRUNCATED_GRACE_S", raising=False)
    s = shoefix_env
    put(s, "w.jsonl", jsonl(rec(1)) + TAIL, age_s=240)
    put(s, "a.jsonl", jsonl(rec(2), rec(3)) + b"not json\n")
    with caplog.at_level(logging.INFO, logger="shoefix_tasks.intake.collect"):
        ref = collect_batch(s, "run-1")
        assert ref.summary == ("collected 2 new records from 2 files; 1 record quarantined at intake (parse 1); "
                               "1 file deferred (w.jsonl: truncated, 4 min old; grace 60 min)")
        again = collect_batch(s, "run-2")
    assert again.summary == "nothing new: 1 file deferred (w.jsonl: truncated, 4 min old; grace 60 min)"
    assert (again.deferred, again.deferred_files, again.waiting[0]["name"]) == (0, 1, "w.jsonl")
    assert f"collect_qa run-2: {again.summary}" in caplog.messages
    assert collect_batch(s, "run-2").summary == again.summary  # a retried task returns the stored account
    put(s, "bad.jsonl", b"not json\n")
    assert collect_batch(s, "run-3").summary.startswith(
        "nothing new to validate: 1 record quarantined at intake (parse 1); 1 file deferred (w.jsonl:")


def test_an_older_ledger_gets_the_new_column(tmp_path):
    """inbox_files.modified_at was added after release: a ledger made before it is upgraded in place."""
    url = f"sqlite:///{tmp_path}/old-ledger.db"
    old = sa.create_engine(url)
    with old.begin() as conn:
        conn.execute(sa.text("CREATE TABLE inbox_files (file_sha VARCHAR(64) PRIMARY KEY, source VARCHAR(1000) NOT NULL, "
                             "name VARCHAR(1000) NOT NULL, size BIGINT NOT NULL, status VARCHAR(20) NOT NULL, "
                             "batch_id VARCHAR(250) NOT NULL, seen_at DATETIME NOT NULL)"))
        conn.execute(sa.text("INSERT INTO inbox_files VALUES ('abc', 'inbox', 'a.jsonl', 3, 'processed', 'b1', "
                             "'2026-01-01 00:00:00')"))
    old.dispose()
    engine = ledger.engine_for(url)
    assert "modified_at" in {c["name"] for c in sa.inspect(engine).get_columns("inbox_files")}
    with engine.connect() as conn:
        assert conn.execute(sa.select(ledger.inbox_files.c.name, ledger.inbox_files.c.modified_at)).all() == [
            ("a.jsonl", None)]
