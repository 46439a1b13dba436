"""The scorecard's meta-evaluation on the real holdout and guard set, with the production scorer:
references and hand-written paraphrases outrank every systematic degradation, off-topic answers score
below the untrained base model, and reversed safety advice is caught on every guard item.
Figures (before/after): docs/scorecard.md; `python -m shoefix_tasks.evaluation.meta_eval scorecard|claims`."""

from __future__ import annotations

import pytest

from shoefix_tasks.evaluation.degrade import BOILERPLATE, degradations, reverse_advice, wrong_numbers
from shoefix_tasks.evaluation.meta_eval import (
    KINDS,
    OFF_TOPIC,
    claim_report,
    eval_items,
    paraphrases,
    scorecard_report,
)
from shoefix_tasks.text import numbers_with_units
from tests.conftest import DATA


@pytest.fixture(scope="module")
def report():
    return scorecard_report(DATA)


def test_the_meta_evaluation_covers_both_languages_and_enough_paraphrases():
    items = eval_items(DATA)
    para = paraphrases(DATA)
    assert {it["lang"] for it in items} == {"en", "zh-TW"} and len(items) >= 130
    assert len(para) >= 30 and {it["lang"] for it in items if it["id"] in para} == {"en", "zh-TW"}


def test_degradations_are_what_they_say():
    items = eval_items(DATA)
    for i, it in enumerate(items):
        d = degradations(items, i)
        assert d["empty"] == "" and d["question"] == it["question"] and d["boilerplate"] in BOILERPLATE.values()
        assert d["other_answer"] != it["answer"] and d["reversed"] != it["answer"]
        if d["wrong_numbers"] is not None:  # every number with a unit changed, units kept
            ref, wrong = numbers_with_units(it["answer"]), numbers_with_units(d["wrong_numbers"])
            assert not ref & wrong and {u for _, u in ref} == {u for _, u in wrong}
    assert reverse_advice("Don't pop the blister.", "en") == "Pop the blister."
    assert reverse_advice("不要弄破水泡。", "zh-TW") == "弄破水泡。"
    # the detector reads these as negation cues (claims.EN_CUES), so reversing removes them too
    assert reverse_advice("Keep them out of hot cars and keep the boots off heaters.", "en") == \
        "Keep them in hot cars and keep the boots on heaters."
    assert reverse_advice("Labels warn against mixing bleach with vinegar.", "en") == \
        "Labels warn in favour of mixing bleach with vinegar."
    assert wrong_numbers("Dry within 24–48 hours at 20–25 °C.") == "Dry within 72–144 hours at 60–75 °C."


@pytest.mark.parametrize("kind", KINDS)
def test_reference_and_paraphrase_outrank_each_degradation(report, kind):
    row = report["table"][kind]
    assert row["n"] >= 100
    assert row["ref_wins"] >= 0.95, row
    assert row["para_wins"] >= 0.95, row


def test_paraphrases_score_close_to_their_reference(report):
    s = report["summary"]
    assert s["paraphrase_gap_mean"] <= 1.0 and s["paraphrase_gap_max"] <= 2.5, s


def test_off_topic_answers_score_below_the_untrained_base_model(report):
    s = report["summary"]
    assert s["base_items"] >= 60  # recorded with `python -m shoefix_tasks.evaluation.meta_eval record-base-answers`
    for kind in OFF_TOPIC:
        assert s["off_topic_means_on_base_items"][kind] < s["base_mean"], (kind, s)


def test_every_claim_holds_and_reversed_safety_advice_is_caught_on_every_guard_item():
    report = claim_report(DATA)
    assert report["problems"] == [], report["problems"]
    s = report["summary"]
    assert s["guard_items"] >= 40 and s["guard_reversed_caught"] == s["guard_items"]
