"""The holdout-leak check of the intake (issue 12), on real records: the shipped corpus must pass it,
and the training questions that paraphrased holdout items before 2026-12-06 must be quarantined.

`tests/fixtures/leak_issue12.jsonl` keeps those records as they were shipped (our own training text,
never holdout text), each with `paraphrase_of`, the frozen item it asked again: the three pairs of the
issue first, then the four the tightened check found as well (data/CHANGES.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.real_weights.qforms import PHRASINGS_FILE, QFORMS_FILE, with_question_forms
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


def question_forms(phrased: bool = False) -> list[dict]:
    """The rows the GPU experiment adds to the English corpus (`qforms.with_question_forms`): each question form
    under its record's answer (`forms`), or, phrased, under that answer's other wording (`para`)."""
    english = [r for r in corpus() if r["lang"] == "en"]
    wordings = DATA / PHRASINGS_FILE if phrased else None
    return with_question_forms(english, DATA / QFORMS_FILE, phrasings_file=wordings)[len(english):]


def test_question_forms_ask_english_corpus_answers_in_other_words():
    forms = list(iter_jsonl([DATA / QFORMS_FILE]))
    english = {r["id"]: r["question"] for r in corpus() if r["lang"] == "en"}
    assert sorted(f["id"] for f in forms) == sorted(english)  # every English answer, once
    every_question = {question_key(r["question"]) for r in corpus()}
    for f in forms:
        keys = {question_key(q) for q in f["questions"]}
        assert len(f["questions"]) == 2 and len(keys) == 2 and not keys & every_question, f["id"]


@pytest.mark.parametrize("phrased", [False, True], ids=["same answer", "own wording"])
def test_question_forms_pass_the_holdout_checks(frozen, phrased):
    """A form shares its answer with its record and its sibling form, which the batch's own duplicate check
    flags by design (only that); against the frozen sets each must pass, and stay below the paraphrase threshold.
    The same holds with each form under its own wording of the answer, the rows `para` trains on."""
    rows = question_forms(phrased)

    def sibling(row_id: str, reason: str) -> bool:  # the other form of the same record
        return reason.startswith(f"near_duplicate_in_batch({row_id.rsplit('-f', 1)[0]}-f")

    failures = {rows[i]["id"]: f for i, f in screen(rows, frozen).items()
                if [x for x in f if not sibling(rows[i]["id"], x)]}
    assert failures == {}
    closest = distribution(rows, load_eval_set(DATA, "holdout") + load_eval_set(DATA, "guard"))
    assert closest[0][0] < PARAPHRASE_THRESHOLD, closest[:5]


def figures(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:[.,:]\d+)*", text))


def test_answer_phrasings_restate_their_records_facts_in_other_words():
    """data/answer_phrasings.jsonl: two more wordings of every English corpus answer, for `para`. A wording
    may not add or lose a fact, so each keeps exactly its answer's figures and every key fact the answer
    states, word for word; and each must really be worded anew (few of its 4-word runs are the answer's or
    its sibling's), or it teaches nothing a second pass over the answer would not."""
    english = {r["id"]: r for r in corpus() if r["lang"] == "en"}
    worded = {p["id"]: p["answers"] for p in iter_jsonl([DATA / PHRASINGS_FILE])}
    assert sorted(worded) == sorted(english)
    for rid, answers in worded.items():
        source = english[rid]["answer"]
        assert len(answers) == 2, rid
        for text in answers:
            assert figures(text) == figures(source), (rid, figures(text) ^ figures(source))
            lost = [f for f in english[rid]["key_facts"] if f.lower() in source.lower() and f.lower() not in text.lower()]
            assert not lost, (rid, lost)
            assert 0.75 <= len(text.split()) / len(source.split()) <= 1.3, rid
            assert shared_runs(text, source) <= 0.3, rid
        assert shared_runs(answers[0], answers[1]) <= 0.3, rid


def shared_runs(a: str, b: str, n: int = 4) -> float:
    """The share of a's n-word runs that b also has."""
    def runs(t: str) -> set[tuple[str, ...]]:
        w = re.findall(r"[a-z0-9%°]+(?:[-'’][a-z0-9]+)*", t.lower())
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    ra = runs(a)
    return len(ra & runs(b)) / max(1, len(ra))


def test_the_phrasing_checks_refuse_a_wording_that_changes_a_figure_or_copies():
    answer = "Dry them for 24–48 hours at room temperature, then wipe with 70% isopropyl alcohol."
    assert figures("Wipe with 70% isopropyl alcohol after 24–48 hours of drying at room temperature.") == figures(answer)
    assert figures(answer.replace("70%", "60%")) != figures(answer)
    assert shared_runs(answer.replace("Dry", "Leave"), answer) > 0.3
    assert shared_runs("Wipe with 70% isopropyl alcohol once they have dried for a day or two.", answer) <= 0.3
