"""Scorers on hand-checked examples, including answers that must score low."""

from __future__ import annotations

import pytest

from shoefix_tasks import metrics as m

ITEM = {
    "id": "x-en", "lang": "en", "topic": "mechanisms",
    "answer": "Dry them within 24–48 hours, because mold can start growing on wet materials after that. Remove "
              "the insoles, stuff the shoes with newspaper, change the paper every few hours and let them "
              "air-dry at room temperature, about 20–25 °C.",
    "key_points": ["dry within 24–48 hours", "remove insoles", "newspaper"],
    "key_facts": ["24–48 hours", "20–25 °C"],
}
ZH = {
    "id": "x-zh", "lang": "zh-TW", "topic": "mechanisms",
    "answer": "請在24–48 小時內把鞋子弄乾，否則潮濕的材料上就可能開始長黴菌。取出鞋墊，用報紙塞滿鞋子，每隔幾小時更換一次，"
              "並在約20–25 °C的室溫下自然風乾。",
    "key_points": ["24–48 小時內弄乾", "取出鞋墊", "報紙"],
    "key_facts": ["24–48 小時", "20–25 °C"],
}


def score(item, answer):
    return m.score_answer(item, answer)


def test_reference_scores_top_marks():
    s = score(ITEM, ITEM["answer"])
    assert (s.completeness, s.key_data_accuracy, s.semantic_consistency, s.readability) == (10, 10, 10, 10)
    z = score(ZH, ZH["answer"])
    assert z.composite == 10


def test_fluent_but_wrong_answer_scores_low():
    wrong = "Put the wet shoes right next to a heater at 80 °C for 3 hours so they dry quickly. That is all you need."
    s = score(ITEM, wrong)
    assert s.readability >= 8  # it is fluent ...
    assert s.completeness <= 2 and s.key_data_accuracy <= 2 and s.semantic_consistency <= 5  # ... and wrong
    assert s.composite < 5


def test_wrong_numbers_are_penalised_beyond_missing():
    right = score(ITEM, "Dry them within 24–48 hours, at about 20–25 °C, with newspaper and the insoles removed.")
    wrong = score(ITEM, "Dry them within 5–6 hours, at about 60–70 °C, with newspaper and the insoles removed.")
    missing = score(ITEM, "Dry them soon, at a warm temperature, with newspaper and the insoles removed.")
    assert right.key_data_accuracy == 10
    assert wrong.key_data_accuracy < missing.key_data_accuracy or wrong.key_data_accuracy == 1
    assert m.numbers_with_units("24–48 hours and 60%") == {("24-48", "hour"), ("60", "%")}


def test_degenerate_repetition_scores_low():
    rep = "Dry the shoes. " * 12
    s = score(ITEM, rep)
    assert s.readability < 6 and s.composite < 4
    assert m.repetition_rate(rep) > 0.5 and m.repetition_rate(ITEM["answer"]) == 0


def test_truncated_answer_loses_readability():
    cut = ITEM["answer"][:120]
    assert score(ITEM, cut).readability < score(ITEM, ITEM["answer"]).readability


def test_self_contradiction_is_penalised():
    a = "Use chlorine bleach on leather shoes. Never use chlorine bleach on leather shoes."
    assert m.self_contradictions(a) == 1
    assert m.semantic_consistency(a, a) < 10


def test_chinese_paraphrase_beats_unrelated_chinese():
    para = "鞋子濕了要在24–48 小時內乾燥，先取出鞋墊，再塞報紙吸水，放在20–25 °C的室溫通風處風乾。"
    other = "跑鞋的中底在跑了很多公里以後會失去緩衝，應該定期更換。"
    assert score(ZH, para).composite > score(ZH, other).composite + 3


@pytest.mark.parametrize("answer", ["", "   "])
def test_empty_answer_is_minimum(answer):
    assert score(ITEM, answer).composite == pytest.approx(1.0)


@pytest.mark.parametrize("answer", ["...", "!!! ???", "。。。"])
def test_symbol_only_answer_does_not_crash_and_scores_low(answer):
    s = score(ITEM, answer)
    assert s.composite < 4
