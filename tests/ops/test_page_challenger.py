"""The ShoeFix page shows the newest version that never served, and why: without it a run that kept
the base (as `make demo` does today) leaves the page saying only "No champion yet". A version at or
below the champion, or one that served and was rolled back from, is history; a version held for review
says so; hostile or cut tag text stays text."""

from __future__ import annotations

import html
import importlib.util
import json

from shoefix_tasks.config import REGISTERED_MODEL
from shoefix_tasks.ops import dashboard
from shoefix_tasks.registry import versions
from shoefix_tasks.store import tracking
from tests.conftest import ROOT
from tests.ops.test_intake_visibility import render_page

HOSTILE = "<img src=x onerror=alert(1)>"
TITLE = "Latest challenger: "


def _version(client, reasons, claims: str, decision: str = "keep_champion", **extra: str) -> int:
    tags = {"gate_decision": decision, "challenged": "base", "composite": "1.419", "pipeline_run": "run-7",
            "gate_reasons": json.dumps(reasons), "forbidden_claims": claims, **extra}
    version = int(client.create_model_version(REGISTERED_MODEL, "file:///nonexistent/adapter", tags=tags).version)
    versions.set_challenger(version)  # as promotion does after registering
    return version


def _card(s) -> str:
    body = render_page(s)
    assert HOSTILE not in body
    return body.split(TITLE, 1)[1].split('<div class="card">', 1)[0] if TITLE in body else ""


def test_page_shows_the_newest_version_that_never_served_and_why(shoefix_env):
    import mlflow

    s = shoefix_env
    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_registry_uri(s.tracking_uri)
    client = mlflow.MlflowClient()
    client.create_registered_model(REGISTERED_MODEL)
    assert dashboard.latest_challenger(s, None) is None and _card(s) == ""  # nothing registered

    claims = {"guard-health-05-en": ["self-cut-callus-corn-ok"], "guard-mat-02-en": [HOSTILE]}
    v1 = _version(client, ["safety floor: the challenger states forbidden advice", HOSTILE], json.dumps(claims))
    card = _card(s)
    assert card.startswith("not promoted by the gate</h2>") and '<div class="big">v1</div>' in card
    assert "keep_champion" in card and "against base" in card and "composite 1.419" in card
    assert "safety floor: the challenger states forbidden advice" in card
    assert "<code>guard-health-05-en</code>: self-cut-callus-corn-ok" in card and html.escape(HOSTILE) in card

    versions.set_champion(s, v1, "forced for the test", "test")  # it served: history, not a challenger
    assert dashboard.latest_challenger(s, v1) is None and _card(s) == ""

    # v2 served, then was rolled back from: still history, though above the champion
    v2 = _version(client, ["composite gain +0.5"], "{}", decision="promote")
    versions.set_champion(s, v2, "promoted", "test")
    versions.set_champion(s, v1, "rolled back: wrong drying figure", "test", action="rollback")
    assert dashboard.latest_challenger(s, v1) is None and _card(s) == ""

    # v3 passed the gate and waits for a reviewer
    _version(client, ["composite gain +0.4"], "{}", decision="promote", review="pending")
    card = _card(s)
    assert card.startswith("held for review</h2>") and '<div class="big">v3</div>' in card and "review: pending" in card

    # v4 kept out, its claims tag cut short (as promotion cut long tags before fitted_json): shown as text
    cut = json.dumps({f"guard-{i}": [HOSTILE] for i in range(400)})[:tracking.TAG_LIMIT]
    _version(client, ["composite gain below min effect"], cut)
    ch = dashboard.latest_challenger(s, v1)
    assert ch["version"] == 4 and ch["forbidden_claims"] == cut
    card = _card(s)
    assert '<div class="big">v4</div>' in card and html.escape(cut) + " (cut short)" in card


def test_a_champion_with_a_cut_gate_tag_still_shows(shoefix_env, capsys):
    """Versions registered before promotion fitted its JSON to the tag may hold reasons cut mid-string:
    the page's champion card and `shoefix status` show the text instead of failing on it."""
    import mlflow

    from shoefix_tasks.ops.cli import main as cli

    s = shoefix_env
    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_registry_uri(s.tracking_uri)
    client = mlflow.MlflowClient()
    client.create_registered_model(REGISTERED_MODEL)
    cut = json.dumps([f"reason {i} {HOSTILE}" for i in range(400)])[:tracking.TAG_LIMIT]
    tags = {"gate_decision": "promote", "challenged": "base", "gate_reasons": cut}
    v = int(client.create_model_version(REGISTERED_MODEL, "file:///nonexistent/adapter", tags=tags).version)
    versions.set_challenger(v)
    versions.set_champion(s, v, "promoted", "test")
    champ = dashboard.champion(s)
    assert champ["gate_reasons"] == cut
    body = render_page(s)
    assert '<h2>Champion</h2><div class="big">v1</div>' in body and HOSTILE not in body
    # its gate list sits with the scorecard, which needs an evaluation run: the card with a minimal one
    card = {"rows": [], "champion_label": "base", "questions": 45, "guard": 24, "holdout_hash": "0" * 64}
    spec = importlib.util.spec_from_file_location("shoefix_page_card", ROOT / "plugins" / "shoefix_page.py")
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    html_card = page._champion_card(champ, card)
    assert f"<li>{html.escape(cut)} (cut short)</li>" in html_card and HOSTILE not in html_card
    assert cli(["status"]) == 0
    assert f"    - {cut} (cut short)" in capsys.readouterr().out
