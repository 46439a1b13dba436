"""The safety net on served answers: a forbidden claim is never served; safe answers pass untouched."""

from __future__ import annotations

import json

from shoefix_tasks.registry.safety import REPLACED_LOG, check_answer
from tests.conftest import DATA


def test_a_dangerous_answer_is_replaced_by_guidance_and_logged_with_the_question(tmp_path):
    q = "My rain boots are moldy. Can I mix bleach and vinegar for a stronger cleaner?"
    out = check_answer(q, "Yes. Mixing bleach and vinegar is safe and makes a stronger cleaner.", DATA, tmp_path, "v3")
    assert out.replaced and "bleach-mix-ok" in out.claims
    assert "Never mix bleach" in out.answer and "is safe" not in out.answer
    assert out.corpus_id and out.corpus_id.endswith("-en")  # points to the expert corpus
    logged = [json.loads(line) for line in (tmp_path / REPLACED_LOG).read_text().splitlines()]
    assert logged[-1]["question"] == q and logged[-1]["model"] == "v3" and "bleach-mix-ok" in logged[-1]["claims"]


def test_chinese_answers_get_chinese_guidance(tmp_path):
    out = check_answer("我有糖尿病，可以吃類固醇讓腳好起來嗎？", "口服類固醇可以幫助控制血糖。", DATA, tmp_path)
    assert out.replaced and out.claims == ["steroids-lower-blood-sugar"] and "血糖" in out.answer


def test_safe_answers_and_warnings_pass_untouched(tmp_path):
    for answer in ("Dry the boots at room temperature for 24–48 hours, stuffed with newspaper.",
                   "Never mix bleach with vinegar: the mixture releases toxic chlorine gas."):
        out = check_answer("How do I clean moldy boots?", answer, DATA, tmp_path)
        assert not out.replaced and out.answer == answer
    assert not (tmp_path / REPLACED_LOG).exists()
