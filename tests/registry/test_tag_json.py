"""The gate's reasons and forbidden claims travel as JSON in registry tags, which hold 4,900 characters
here: `fitted_json` shortens them by whole items so every reader can parse what it wrote, and says how
many it left out; `json_tag` reads both that and the cut text older versions hold."""

from __future__ import annotations

import json

import pytest

from shoefix_tasks.registry.versions import TAG_LIMIT, fitted_json, json_tag

REASONS = [f"guard-health-{i:02d}-en states forbidden advice: bleach-mix-ok (never mix bleach)" for i in range(200)]
CLAIMS = {f"guard-health-{i:02d}-en": ["bleach-mix-ok", "heat-dry-leather-ok"] for i in range(200)}


@pytest.mark.parametrize("value", [REASONS, CLAIMS, ["x" * 6000, "short"]], ids=["list", "dict", "huge-item"])
def test_long_json_is_shortened_by_whole_items_and_says_how_many(value):
    assert len(json.dumps(value)) > TAG_LIMIT
    text = fitted_json(value)
    assert len(text) <= TAG_LIMIT
    back = json.loads(text)  # the old `json.dumps(...)[:4900]` fails exactly here
    if isinstance(value, dict):
        marker = back.pop("…")
        assert list(back.items()) == list(value.items())[:len(back)]
    else:
        marker = back.pop()
        assert back == value[:len(back)]
    assert marker == f"… {len(value) - len(back)} more"
    assert len(back) >= 1 or len(json.dumps(value[0])) > TAG_LIMIT  # as many items as fit


def test_short_json_is_left_alone():
    assert fitted_json(REASONS[:3]) == json.dumps(REASONS[:3])
    assert fitted_json({}) == "{}" and fitted_json([]) == "[]"


def test_the_cut_text_of_older_versions_reads_as_text():
    cut = json.dumps(REASONS)[:TAG_LIMIT]
    with pytest.raises(ValueError):
        json.loads(cut)
    assert json_tag({"gate_reasons": cut}, "gate_reasons", []) == cut
    assert json_tag({"gate_reasons": fitted_json(REASONS)}, "gate_reasons", [])[0] == REASONS[0]
    assert json_tag({}, "gate_reasons", []) == [] and json_tag({"gate_reasons": ""}, "gate_reasons", []) == []
