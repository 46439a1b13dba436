"""Path safety of the inbox and of the urgent DAG's `files` param.

Every refused name gets a quarantined ledger row with check `unsafe_path` and its reason; a bad
`files` entry is a clear error before anything is read. Proven, not assumed: a Python audit hook
records every file the process opens during collection, and none of them may lie outside the
inbox; every inbox entry (bytes, mode, mtime) is the same afterwards.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from shoefix_tasks.intake.collect import collect_batch
from shoefix_tasks.intake.inbox import unsafe_name
from shoefix_tasks.pipeline import collect_qa
from shoefix_tasks.store import ledger
from tests.conftest import FIXTURES

ROWS = [json.loads(x) for x in (FIXTURES / "corpus_small.jsonl").read_text().splitlines()]
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while _OPENED is a list


def opened_during(fn, *args, **kwargs):
    global _OPENED
    _OPENED = []
    try:
        return fn(*args, **kwargs), [os.path.realpath(p) for p in _OPENED]
    finally:
        _OPENED = None


def line(i: int, **kw) -> bytes:
    rec = {k: ROWS[i][k] for k in ("id", "question", "answer", "topic", "lang")} | kw
    return json.dumps(rec, ensure_ascii=False).encode() + b"\n"


def state_of(inbox: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(inbox):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = Path(p).read_bytes() if os.path.isfile(p) and not os.path.islink(p) else os.path.islink(p)
            out[os.path.relpath(p, inbox)] = (st.st_mode, st.st_mtime_ns, st.st_size, data)
    return out


def refusals(s, batch: str) -> dict[str, str]:
    with ledger.engine_for(s.ledger_url).connect() as conn:
        rows = conn.execute(sa.select(ledger.records.c.source, ledger.records.c.reason).where(
            ledger.records.c.batch_id == batch, ledger.records.c.check_name == "unsafe_path")).all()
    return {src: why for src, why in rows}


def test_hostile_inbox_entries_are_refused_with_a_reason_and_nothing_outside_is_read(shoefix_env, tmp_path):
    s = shoefix_env
    inbox = s.home / "inbox"
    outside = Path(os.path.realpath(tmp_path)) / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_bytes(line(0, id="OUTSIDE-MARKER"))
    (outside / "dir").mkdir()
    (outside / "dir" / "x.jsonl").write_bytes(line(0, id="OUTSIDE-MARKER-2"))

    os.symlink(outside / "secret.jsonl", inbox / "link-out.jsonl")  # symlink to a file outside
    os.symlink(outside / "dir", inbox / "dir-out.jsonl")  # a directory symlink dressed as a file
    os.symlink(os.path.relpath(outside / "secret.jsonl", inbox), inbox / "relative-out.jsonl")
    os.symlink("/nonexistent/x.jsonl", inbox / "dangling.jsonl")
    os.mkfifo(inbox / "pipe.jsonl")  # opening it for reading would block the worker forever
    hostile = {"evil\nname.jsonl": "control", "tab\there.jsonl": "control", "bell\x07.csv": "control",
               "spoof\u202egpj.jsonl": "invisible", "zero\u200bwidth.md": "invisible",
               "-rf.jsonl": "option", "sub/--help.csv": "option"}
    (inbox / "sub").mkdir()
    for i, name in enumerate(hostile):
        (inbox / name).write_bytes(line(i + 1))
    os.makedirs(inbox / "nested" / "deeper")
    os.symlink(inbox / "week 48 鞋子.jsonl", inbox / "nested" / "deeper" / "alias.jsonl")  # inside: fine
    os.close(os.open(os.fsencode(inbox) + b"/latin1-\xe9t\xe9.jsonl", os.O_CREAT | os.O_WRONLY, 0o644))
    # odd but safe: unicode letters and spaces are normal names for our zh-TW experts
    (inbox / "week 48 鞋子.jsonl").write_bytes(line(8) + line(9))
    (inbox / "..hidden-but-inside.jsonl").write_bytes(line(10))
    before = state_of(inbox)

    ref, opened = opened_during(collect_batch, s, "r1")

    assert not [p for p in opened if p.startswith(str(outside))], "read a file outside the inbox"
    assert state_of(inbox) == before  # nothing modified, deleted, or created in the inbox
    why = refusals(s, "r1")
    by_name = {eval(src): reason for src, reason in why.items()}  # sources are repr()s of the names
    for name, kind in hostile.items():
        assert kind in by_name[name], (name, by_name[name])
    for name in ("link-out.jsonl", "dir-out.jsonl", "relative-out.jsonl", "dangling.jsonl"):
        assert by_name[name] == "symlink points outside the inbox"
    assert by_name["pipe.jsonl"] == "not a regular file"
    assert by_name[os.fsdecode(b"latin1-\xe9t\xe9.jsonl")] == "file name is not valid UTF-8"
    assert len(why) == len(hostile) + 6
    # the odd-but-safe files were read (the in-inbox symlink is the same content: counted once)
    with ledger.engine_for(s.ledger_url).connect() as conn:
        rows = conn.execute(sa.select(ledger.records.c.source, ledger.records.c.record_id).where(
            ledger.records.c.status == "collected")).all()
    # (files are taken in name order: the alias comes first, and the original is then a copy)
    assert sorted(rows) == sorted([("..hidden-but-inside.jsonl", ROWS[10]["id"]),
                                   ("nested/deeper/alias.jsonl", ROWS[8]["id"]),
                                   ("nested/deeper/alias.jsonl", ROWS[9]["id"])])
    assert ref.quarantined == len(why) and ref.collected == 3
    with ledger.engine_for(s.ledger_url).connect() as conn:
        payloads = " ".join(p or "" for (p,) in conn.execute(sa.select(ledger.records.c.payload)))
    assert "OUTSIDE-MARKER" not in payloads

    # refusals are recorded once, not again on every run
    ref2 = collect_batch(s, "r2")
    assert ref2.seen == 0 and state_of(inbox) == before


@pytest.mark.parametrize("name, error", [
    ("../outside/secret.jsonl", "escapes the inbox"),
    ("urgent/../../outside/secret.jsonl", "escapes the inbox"),
    ("/etc/passwd.jsonl", "escapes the inbox"),
    ("C:\\Windows\\x.jsonl", "escapes the inbox"),
    ("..\\outside\\secret.jsonl", "escapes the inbox"),
    ("fix\n.jsonl", "control"),
    ("-rf.jsonl", "option"),
    ("", "empty"),
    ("x" * 1200 + ".jsonl", "longer than"),
])
def test_urgent_files_param_with_a_bad_name_is_a_clear_error_before_anything_is_read(
        shoefix_env, tmp_path, name, error):
    s = shoefix_env
    outside = Path(os.path.realpath(tmp_path)) / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_bytes(line(0, id="OUTSIDE-MARKER"))
    (s.home / "inbox" / "urgent").mkdir()
    (s.home / "inbox" / "urgent" / "fix.jsonl").write_bytes(line(1))
    with pytest.raises(ValueError, match=error):
        opened_during(collect_qa, "urgent-1", settings=s, files=[name])
    assert ledger.batch_row(ledger.engine_for(s.ledger_url), "urgent-1") is None  # nothing recorded
    # a good name next to the bad one does not make it through either: all or nothing
    with pytest.raises(ValueError):
        collect_qa("urgent-2", settings=s, files=["urgent/fix.jsonl", name])
    ref, opened = opened_during(collect_qa, "urgent-3", settings=s, files=["urgent/fix.jsonl"])
    assert ref["collected"] == 1 and not [p for p in opened if p.startswith(str(outside))]


def test_urgent_files_param_naming_a_missing_file_or_a_symlink_out(shoefix_env, tmp_path):
    s = shoefix_env
    outside = Path(os.path.realpath(tmp_path)) / "secret.jsonl"
    outside.write_bytes(line(0, id="OUTSIDE-MARKER"))
    os.symlink(outside, s.home / "inbox" / "innocent.jsonl")
    with pytest.raises(FileNotFoundError, match="not in inbox"):
        collect_qa("u1", settings=s, files=["nope.jsonl"])
    ref, opened = opened_during(collect_qa, "u2", settings=s, files=["innocent.jsonl"])
    assert ref["quarantined"] == 1 and ref["collected"] == 0
    assert refusals(s, "u2") == {"'innocent.jsonl'": "symlink points outside the inbox"}
    assert str(outside) not in opened


def test_unsafe_name_rules():
    assert unsafe_name("2026/week 48 鞋子.jsonl") is None and unsafe_name("a-b/c-d.csv") is None
    assert unsafe_name("...jsonl") is None  # dots inside a name are not traversal
    for bad in ("a/../b.jsonl", "/abs.jsonl", "\\abs.jsonl", "a\x00b.jsonl", "a\u2066b.jsonl", "a/-b.md"):
        assert unsafe_name(bad), bad
