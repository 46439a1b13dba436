"""The holdout-leak check of the intake (issue 12), on real records: the shipped corpus must pass it,
and the training questions that paraphrased holdout items before 2026-12-06 must be quarantined.

`tests/fixtures/leak_issue12.jsonl` keeps those records as they were shipped (our own training text,
never holdout text), each with `paraphrase_of`, the frozen item it asked again: the three pairs of the
issue first, then the four the tightened check found as well (data/CHANGES.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoefix_tasks.intake.leak import PARAPHRASE_THRESHOLD, distribution
from shoefix_tasks.intake.validate import ScreenState, _screen, frozen_sets
from shoefix_tasks.records import content_hash, iter_jsonl, load_eval_set, question_key
from tests.conftest import DATA

LEAKS = Path(__file__).resolve().parents[1] / "fixtures" / "leak_issue12.jsonl"
ISSUE_PAIRS = {"odor-026-en": "mech-h06-en", "odor-026-zh": "mat-h05-zh", "perf-030-en": "odor-h03-en"}


@pytest.fixture(scope="module")
def frozen():
    return frozen_sets(DATA)


def corpus() -> list[dict]:
    return list(iter_jsonl(sorted((DATA / "corpus").glob("*.jsonl"))))


def screen(rows: list[dict], frozen) -> dict[int, list[str]]:
    """The intake's own screening (`validate._screen`), as a fresh batch against the frozen sets."""
    return _screen(rows, [content_hash(r["question"], r["answer"]) for r in rows], ScreenState(), frozen)


def test_shipped_corpus_passes_intake_screening(frozen):
    rows = corpus()
    failures = screen(rows, frozen)
    assert failures == {}, {rows[i]["id"]: f for i, f in failures.items()}


def test_shipped_corpus_stays_below_the_paraphrase_threshold():
    frozen = load_eval_set(DATA, "holdout") + load_eval_set(DATA, "guard")
    closest = distribution(corpus(), frozen)
    score, rec, item = closest[0]
    print(f"closest pair: {rec} ~ {item} at {score:.3f}, threshold {PARAPHRASE_THRESHOLD}")
    assert score < PARAPHRASE_THRESHOLD, closest[:5]
    assert len(closest) == len(corpus())


def test_issue_pairs_and_found_paraphrases_are_quarantined(frozen):
    leaks = [json.loads(line) for line in LEAKS.read_text(encoding="utf-8").splitlines()]
    assert {r["id"]: r["paraphrase_of"] for r in leaks[:3]} == ISSUE_PAIRS
    failures = screen(leaks, frozen)
    for i, rec in enumerate(leaks):
        assert failures.get(i), rec["id"]
        assert failures[i][0].startswith(f"near_duplicate_of_holdout({rec['paraphrase_of']}, question paraphrase"), \
            (rec["id"], failures[i])


def test_character_grams_alone_missed_them(frozen):
    """Why the check needed a second measure: the 5-gram MinHash indexes let every one of them in."""
    for line in LEAKS.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        assert frozen.index.query(rec["question"]) is None
        assert frozen.qa_index.query(rec["question"] + " " + rec["answer"]) is None


def test_rewritten_records_ask_new_questions():
    """The replacements keep ids and topics but are not the old questions under new wording."""
    now = {r["id"]: r for r in corpus()}
    for line in LEAKS.read_text(encoding="utf-8").splitlines():
        old = json.loads(line)
        new = now[old["id"]]
        assert (new["qid"], new["topic"], new["lang"]) == (old["qid"], old["topic"], old["lang"])
        assert new["question"] != old["question"] and new["answer"] != old["answer"]
        assert new["created"] == "2026-12-06"


def test_the_cli_reads_the_configured_data_by_default(capsys, monkeypatch):
    """`python -m shoefix_tasks.intake.leak` (docs/quality.md's distribution) with no --data reads the shipped
    corpus and frozen sets, not a folder guessed from the module's own path."""
    from shoefix_tasks.intake.leak import main

    monkeypatch.delenv("SHOEFIX_DATA_DIR", raising=False)
    assert main(["--top", "1"]) == 0
    corpus = list(iter_jsonl(sorted((DATA / "corpus").glob("*.jsonl"))))
    frozen = load_eval_set(DATA, "holdout") + load_eval_set(DATA, "guard")
    assert capsys.readouterr().out.startswith(f"{len(corpus)} records against {len(frozen)} frozen items")


def question_forms() -> list[dict]:
    """data/question_forms.jsonl as training rows: each form under its record's answer (how qforms trains)."""
    records = {r["id"]: r for r in corpus()}
    return [{**records[f["id"]], "id": f"{f['id']}-f{k}", "question": q}
            for f in iter_jsonl([DATA / "question_forms.jsonl"]) for k, q in enumerate(f["questions"], 1)]


def test_question_forms_ask_english_corpus_answers_in_other_words():
    forms = list(iter_jsonl([DATA / "question_forms.jsonl"]))
    english = {r["id"]: r["question"] for r in corpus() if r["lang"] == "en"}
    assert sorted(f["id"] for f in forms) == sorted(english)  # every English answer, once
    every_question = {question_key(r["question"]) for r in corpus()}
    for f in forms:
        keys = {question_key(q) for q in f["questions"]}
        assert len(f["questions"]) == 2 and len(keys) == 2 and not keys & every_question, f["id"]


def test_question_forms_pass_the_holdout_checks(frozen):
    """A form shares its answer with its record and its sibling form, which the batch's own duplicate check
    flags by design (only that); against the frozen sets each must pass, and stay below the paraphrase threshold."""
    rows = question_forms()

    def sibling(row_id: str, reason: str) -> bool:  # the other form of the same record
        return reason.startswith(f"near_duplicate_in_batch({row_id.rsplit('-f', 1)[0]}-f")

    failures = {rows[i]["id"]: f for i, f in screen(rows, frozen).items()
                if [x for x in f if not sibling(rows[i]["id"], x)]}
    assert failures == {}
    closest = distribution(rows, load_eval_set(DATA, "holdout") + load_eval_set(DATA, "guard"))
    assert closest[0][0] < PARAPHRASE_THRESHOLD, closest[:5]
