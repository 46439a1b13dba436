"""The ShoeFix page shows the last challenger the gate kept out, and why: without it a run that kept the
base (as `make demo` does today) leaves the page saying only "No champion yet". A version at or below
the champion is history, not a challenger, and hostile or cut tag text stays text."""

from __future__ import annotations

import json

from shoefix_tasks.config import REGISTERED_MODEL
from shoefix_tasks.ops import dashboard
from tests.ops.test_intake_visibility import render_page

HOSTILE = "<img src=x onerror=alert(1)>"
TITLE = "Latest challenger, not promoted"


def _version(client, reasons, claims: str, decision: str = "keep_champion") -> str:
    tags = {"gate_decision": decision, "challenged": "base", "composite": "1.419", "pipeline_run": "run-7",
            "gate_reasons": json.dumps(reasons), "forbidden_claims": claims}
    return client.create_model_version(REGISTERED_MODEL, "file:///nonexistent/adapter", tags=tags).version


def test_page_shows_the_last_challenger_not_promoted_and_why(shoefix_env):
    import mlflow

    s = shoefix_env
    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_registry_uri(s.tracking_uri)
    client = mlflow.MlflowClient()
    client.create_registered_model(REGISTERED_MODEL)
    assert dashboard.latest_challenger(s, None) is None and TITLE not in render_page(s)  # nothing registered

    claims = {"guard-health-05-en": ["self-cut-callus-corn-ok"], "guard-mat-02-en": [HOSTILE]}
    v1 = _version(client, ["safety floor: the challenger states forbidden advice", HOSTILE], json.dumps(claims))
    body = render_page(s)
    card = body.split(TITLE, 1)[1].split('<div class="card">', 1)[0]
    assert '<div class="big">v1</div>' in card and "keep_champion" in card and "against base" in card
    assert "composite 1.419" in card and "safety floor: the challenger states forbidden advice" in card
    assert "<code>guard-health-05-en</code>: self-cut-callus-corn-ok" in card
    assert HOSTILE not in body and "&lt;img src=x onerror=alert(1)&gt;" in card

    client.set_registered_model_alias(REGISTERED_MODEL, "champion", v1)  # promoted: history, not a challenger
    assert dashboard.latest_challenger(s, int(v1)) is None and TITLE not in render_page(s)

    # a newer version kept out, whose claims tag promotion cut short: shown as the text it is
    cut = json.dumps({f"guard-{i}": ["heat-dry-leather-ok"] for i in range(400)})[:4900]
    _version(client, ["composite gain below min effect"], cut)
    ch = dashboard.latest_challenger(s, int(v1))
    assert ch["version"] == 2 and ch["forbidden_claims"] == cut
    card = render_page(s).split(TITLE, 1)[1]
    assert '<div class="big">v2</div>' in card and "composite gain below min effect" in card
