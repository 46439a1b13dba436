"""The gate's reasons and forbidden claims travel as JSON in registry tags, which hold 4,900 characters
here: `fitted_json` shortens them so every reader can parse what it wrote, keeping the start of a reason
too long on its own and saying how many items it left out; `json_tag` reads both that and the cut text
older versions hold."""

from __future__ import annotations

import json

import pytest

from shoefix_tasks.store.tracking import TAG_LIMIT, fitted_json, json_tag

REASONS = [f"guard-health-{i:02d}-en states forbidden advice: bleach-mix-ok (never mix bleach)" for i in range(200)]
CLAIMS = {f"guard-health-{i:02d}-en": ["bleach-mix-ok", "heat-dry-leather-ok"] for i in range(200)}
FLOOR = "safety floor: the challenger states forbidden advice: " + ", ".join(f"claim-{i}-ok" for i in range(600))
ZH = [f"第{i}題：漂白水不可與醋或氨水混用，會產生有毒氣體" for i in range(300)]


def _check(value, text: str) -> tuple[list, str]:
    """The parsed items kept and the marker; the kept ones are the value's first, and one more would not fit."""
    assert len(text) <= TAG_LIMIT
    back = json.loads(text)  # the old `json.dumps(...)[:4900]` fails exactly here
    if isinstance(value, dict):
        marker = back.pop("… more")
        kept, items = list(back.items()), list(value.items())
    else:
        marker, kept, items = back.pop(), back, value
    assert kept == items[:len(kept)] and marker == f"… {len(items) - len(kept)} more"
    one_more = (json.dumps({**dict(items[:len(kept) + 1]), "… more": marker}) if isinstance(value, dict)
                else json.dumps(items[:len(kept) + 1] + [marker]))
    assert len(one_more) > TAG_LIMIT  # as many items as fit
    return kept, marker


@pytest.mark.parametrize("value", [REASONS, CLAIMS, ZH], ids=["list", "dict", "zh-TW"])
def test_long_json_is_shortened_by_whole_items_and_says_how_many(value):
    assert len(json.dumps(value)) > TAG_LIMIT
    kept, _ = _check(value, fitted_json(value))
    assert len(kept) >= 10


def test_one_reason_too_long_keeps_its_beginning_and_the_rest():
    """The safety floor's reason lists every claim: alone it can pass the limit, and must not push out the
    decision's other reasons, nor disappear itself."""
    reasons = [FLOOR, "composite gain +0.1 below min effect 0.3", "regressed: key-data accuracy"]
    back = json.loads(fitted_json(reasons))
    assert back[0].startswith("safety floor: the challenger states forbidden advice: claim-0-ok")
    assert back[0].endswith("… (cut)") and back[1:] == reasons[1:]


def test_short_json_is_left_alone_and_other_values_are_refused():
    assert fitted_json(REASONS[:3]) == json.dumps(REASONS[:3])
    assert fitted_json({}) == "{}" and fitted_json([]) == "[]"
    with pytest.raises(TypeError):
        fitted_json("a reason")  # a string would be cut into characters
    with pytest.raises(TypeError):
        fitted_json(REASONS, limit=10)


def test_the_cut_text_of_older_versions_reads_as_text():
    cut = json.dumps(REASONS)[:TAG_LIMIT]
    with pytest.raises(ValueError):
        json.loads(cut)
    assert json_tag({"gate_reasons": cut}, "gate_reasons", []) == cut
    assert json_tag({"gate_reasons": fitted_json(REASONS)}, "gate_reasons", [])[0] == REASONS[0]
    assert json_tag({}, "gate_reasons", []) == [] and json_tag({"gate_reasons": ""}, "gate_reasons", []) == []
    assert json_tag({"gate_reasons": "42"}, "gate_reasons", []) == "42"  # JSON, but not a list: text
