"""Scorers on hand-checked examples, including answers that must score low. The scoring context
(rarity weights, the other references) is the shipped data, as in production."""

from __future__ import annotations

import pytest

from shoefix_tasks.evaluation import metrics as m
from shoefix_tasks.evaluation.degrade import BOILERPLATE
from shoefix_tasks.text import numbers_with_units, repetition_rate
from tests.conftest import DATA

ITEM = {
    "id": "x-en", "qid": "x", "lang": "en", "topic": "mechanisms",
    "question": "My leather boots got soaked in a storm. How should I dry them so they don't go moldy?",
    "answer": "Dry them within 24–48 hours, because mold can start growing on wet materials after that. Remove "
              "the insoles, stuff the shoes with newspaper, change the paper every few hours and let them "
              "air-dry at room temperature, about 20–25 °C. Do not put them on a radiator or use a hair dryer: "
              "heat above 40 °C cracks leather.",
    "key_points": ["dry within 24–48 hours", "remove insoles", "newspaper", "no heat above 40 °C"],
    "key_facts": ["24–48 hours", "20–25 °C", "40 °C"],
}
ZH = {
    "id": "x-zh", "qid": "x", "lang": "zh-TW", "topic": "mechanisms",
    "question": "我的皮靴在暴雨中濕透了，要怎麼弄乾才不會發霉？",
    "answer": "請在24–48 小時內把鞋子弄乾，否則潮濕的材料上就可能開始長黴菌。取出鞋墊，用報紙塞滿鞋子，每隔幾小時更換一次，"
              "並在約20–25 °C的室溫下自然風乾。不要放在暖氣上或用吹風機吹：超過 40 °C 的高溫會讓皮革龜裂。",
    "key_points": ["24–48 小時內弄乾", "取出鞋墊", "報紙", "不要用超過 40 °C 的熱"],
    "key_facts": ["24–48 小時", "20–25 °C", "40 °C"],
}


@pytest.fixture(scope="module")
def ctx():
    return m.Context.from_data(DATA)


def score(ctx, item, answer):
    return m.score_answer(item, answer, ctx)


def test_reference_scores_top_marks(ctx):
    assert score(ctx, ITEM, ITEM["answer"]).composite >= 9.5
    assert score(ctx, ZH, ZH["answer"]).composite >= 9.5


def test_fluent_but_wrong_answer_scores_low(ctx):
    wrong = "Put the wet boots right next to a heater at 80 °C for 3 hours so they dry quickly. That is all you need."
    s = score(ctx, ITEM, wrong)
    assert s.composite < 3 and s.key_data_accuracy < 2


def test_a_wrong_number_costs_more_than_leaving_it_out(ctx):
    base = ("Dry them within 24–48 hours, stuff them with newspaper, remove the insoles, keep them at {b}, and "
            "keep radiators and hair dryers away: heat above {c} cracks leather.")
    right = m.key_data_accuracy(base.format(b="20–25 °C", c="40 °C"), ITEM)
    missing = m.key_data_accuracy(base.format(b="room temperature", c="high settings"), ITEM)
    wrong = m.key_data_accuracy(base.format(b="60–70 °C", c="90 °C"), ITEM)
    assert right == 1.0 and 0 < missing < right and wrong < missing
    assert score(ctx, ITEM, base.format(b="60–70 °C", c="90 °C")).composite < \
        score(ctx, ITEM, base.format(b="room temperature", c="high settings")).composite
    assert m.key_data_accuracy("Dry them in 24 to 48 hours, below 40 °C, at 20–25 °C.", ITEM) == 1.0


def test_numbers_are_read_with_their_units():
    assert numbers_with_units("24–48 hours and 60%") == {("24-48", "hour"), ("60", "%")}
    assert numbers_with_units("between 24 and 48 hours, two weeks, 60 degrees Celsius") == {
        ("24-48", "hour"), ("2", "week"), ("60", "°c")}


@pytest.mark.parametrize("answer", ["boilerplate", "question", "other"])
def test_answers_that_do_not_address_the_question_earn_nothing(ctx, answer):
    item = {"id": "y-en", "qid": "y", "lang": "en", "topic": "performance",
            "question": "My SRA-rated work shoes slip on wet tiles at home. Are they broken?",
            "answer": "Probably not. SRA means the sole passed the EN ISO 13287 test on ceramic tile wetted with a "
                      "sodium lauryl sulfate solution, with a coefficient of at least 0.28 on the heel and 0.32 "
                      "flat; a soapy bathroom floor is slicker than that test, and a worn or dirty tread loses grip. "
                      "Clean the outsoles, check the tread depth, and use a non-slip bath mat.",
            "key_points": ["SRA test conditions", "soapy floors are slicker", "clean and check the tread"],
            "key_facts": ["SRA", "0.28", "0.32"]}
    other = ("Leather boots should dry at room temperature within 24–48 hours, stuffed with newspaper and away "
             "from radiators, because heat above 40 °C cracks leather.")
    text = {"boilerplate": BOILERPLATE["en"], "question": item["question"], "other": other}[answer]
    s = score(ctx, item, text)
    assert s.relevance == 0 and s.composite == pytest.approx(1.0)  # fluent, on the domain, and worth nothing
    assert score(ctx, item, item["answer"]).composite > 9


def test_boilerplate_on_a_question_it_happens_to_answer_stays_below_the_reference(ctx):
    # the boilerplate is about drying, so it partly answers this drying question: relevant, not best
    assert score(ctx, ITEM, BOILERPLATE["en"]).composite < score(ctx, ITEM, ITEM["answer"]).composite - 1


def test_reversed_advice_is_a_contradiction(ctx):
    reversed_ = ITEM["answer"].replace("Do not put", "Put")
    assert m.contradictions(reversed_, ITEM["answer"], "en") >= 1
    assert m.contradictions(ITEM["answer"], ITEM["answer"], "en") == 0
    assert score(ctx, ITEM, reversed_).composite < score(ctx, ITEM, ITEM["answer"]).composite - 1
    zh_rev = ZH["answer"].replace("不要放在", "放在")
    assert score(ctx, ZH, zh_rev).composite < score(ctx, ZH, ZH["answer"]).composite - 1


def test_scoped_negation_is_not_a_contradiction(ctx):
    # "rather than" negates only what follows it: the same advice, not its reverse
    para = ("Get the insoles out and fill the boots with newspaper, swapping it every few hours. Let them dry at "
            "room temperature, about 20–25 °C, rather than near a radiator or a hair dryer, and finish within "
            "24–48 hours, as mold starts after that; over 40 °C leather cracks.")
    assert m.contradictions(para, ITEM["answer"], "en") == 0
    assert score(ctx, ITEM, para).composite > 8


def test_degenerate_repetition_scores_low(ctx):
    rep = "Dry the boots with newspaper. " * 12
    s = score(ctx, ITEM, rep)
    assert s.readability < 6 and s.composite < 5
    assert repetition_rate(rep) > 0.5 and repetition_rate(ITEM["answer"]) == 0


def test_truncated_answer_scores_below_the_whole(ctx):
    cut = ITEM["answer"][: len(ITEM["answer"]) // 2]
    assert score(ctx, ITEM, cut).composite < score(ctx, ITEM, ITEM["answer"]).composite


def test_self_contradiction_is_penalised():
    a = "Use chlorine bleach on leather shoes. Never use chlorine bleach on leather shoes."
    assert m.self_contradictions(a) == 1


def test_chinese_paraphrase_beats_unrelated_chinese(ctx):
    para = "鞋子濕了要在24–48 小時內乾燥，先取出鞋墊，再塞報紙吸水，放在20–25 °C的室溫通風處風乾，別用超過 40 °C 的暖氣或吹風機。"
    other = "跑鞋的中底在跑了很多公里以後會失去緩衝，應該定期更換。"
    assert score(ctx, ZH, para).composite > score(ctx, ZH, other).composite + 3


@pytest.mark.parametrize("answer", ["", "   ", "...", "!!! ???", "。。。"])
def test_empty_or_symbol_only_answer_is_minimum(ctx, answer):
    assert score(ctx, ITEM, answer).composite == pytest.approx(1.0)
