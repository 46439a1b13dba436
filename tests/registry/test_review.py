"""A person's hold on a promotion, the pure parts: the policy section, what a trigger may ask for
(tighten to `review`, never loosen to `auto`), the verdict on a reviewer's answer (fail closed on
anything but a signed Approve against the champion the gate saw), and the reviewer's page."""

from __future__ import annotations

import dataclasses

import pytest

from shoefix_tasks.config import Settings
from shoefix_tasks.ops.trigger import TriggerRefused, param_schemas, validate_conf
from shoefix_tasks.policy import Policy, PromotionPolicy, policy_from_dict, stricter_mode
from shoefix_tasks.registry.review import APPROVE, REJECT, review_body, review_verdict

URGENT, WEEKLY = "shoefix_urgent_update", "shoefix_weekly_retrain"
REVIEW = Policy(promotion=PromotionPolicy(mode="review"))


@pytest.fixture()
def settings(tmp_path, monkeypatch) -> Settings:
    monkeypatch.delenv("SHOEFIX_POLICY", raising=False)
    (tmp_path / "inbox").mkdir()
    return dataclasses.replace(Settings.from_env(), inbox=str(tmp_path / "inbox"))


def test_policy_section_defaults_to_auto_and_refuses_unknown_modes():
    assert Policy().promotion == PromotionPolicy("auto", 72.0)
    assert policy_from_dict({"promotion": {"mode": "review", "review_timeout_hours": 0.5}}).promotion.mode == "review"
    for bad in ({"mode": "manual"}, {"review_timeout_hours": 0}, {"approvers": ["x"]}):
        with pytest.raises(ValueError):
            policy_from_dict({"promotion": bad})
    assert Policy().digest != REVIEW.digest  # recorded with each decision: a review policy is a different policy


@pytest.mark.parametrize(("configured", "asked", "mode"), [
    ("auto", None, "auto"), ("auto", "auto", "auto"), ("auto", "review", "review"),
    ("review", None, "review"), ("review", "review", "review"), ("review", "auto", "review")])
def test_the_stricter_mode_wins(configured, asked, mode):
    assert stricter_mode(configured, asked) == mode


@pytest.mark.parametrize("dag_id", [URGENT, WEEKLY])
def test_a_trigger_may_tighten_the_policy_never_loosen_it(settings, dag_id):
    conf = {"reason": "wrong drying temperature"} if dag_id == URGENT else {}
    check = lambda policy, **c: validate_conf(dag_id, {**conf, **c}, policy, settings)["promotion"]  # noqa: E731
    assert check(Policy()) == "auto"
    assert check(Policy(), promotion="policy") == "auto"
    assert check(Policy(), promotion="auto") == "auto"
    assert check(Policy(), promotion="review") == "review"  # an urgent fix someone wants to look at first
    assert check(REVIEW) == "review"
    assert check(REVIEW, promotion="review") == "review"
    with pytest.raises(TriggerRefused, match="promotion 'auto' refused: the server's policy requires a review"):
        check(REVIEW, promotion="auto")
    for bad in ("AUTO", "skip", True, None, ["review"]):
        with pytest.raises(TriggerRefused, match="promotion must be"):
            check(Policy(), promotion=bad)
    schema = param_schemas(dag_id)["promotion"]
    assert schema["default"] == "policy" and set(schema["enum"]) == {"policy", "auto", "review"}


def test_the_trigger_form_offers_auto_only_under_an_auto_policy(tmp_path, monkeypatch):
    from tests.conftest import write_policy

    monkeypatch.setenv("SHOEFIX_POLICY", str(write_policy(tmp_path / "p.yaml", base=None, promotion={"mode": "review"})))
    assert param_schemas(URGENT)["promotion"]["enum"] == ["policy", "review"]


def response(option: str | None, name: str | None = "alice", comment: str = "reads well") -> dict:
    return {"chosen_options": [option] if option else [], "params_input": {"comment": comment},
            "responded_by_user": {"id": name, "name": name} if name else None, "responded_at": "2026-12-06T10:00:00Z"}


def test_only_a_signed_approval_against_the_same_champion_promotes():
    ok = review_verdict(response(APPROVE), 5, 4, 4)
    assert (ok.promote, ok.outcome, ok.reviewer, ok.reason) == (True, "approved", "alice", "approved by alice: reads well")
    assert review_verdict(response(APPROVE), 1, None, None).promote  # the base was the champion, and still is

    no = review_verdict(response(REJECT, comment="v4 answers the guard better"), 5, 4, 4)
    assert (no.promote, no.outcome, no.reason) == (False, "rejected", "v5 rejected by alice: v4 answers the guard better")
    timeout = review_verdict(None, 5, 4, 4)
    assert (timeout.promote, timeout.outcome, timeout.reviewer) == (False, "timeout", None)
    # Airflow's defaults applied at the deadline carry no user: never a decision, even if they said Approve
    unsigned = review_verdict(response(APPROVE, name=None), 5, 4, 4)
    assert (unsigned.promote, unsigned.outcome) == (False, "timeout")
    # the champion moved (a rollback, another run) while the review waited: the gate compared the old one
    stale = review_verdict(response(APPROVE), 5, 4, 3)
    assert (stale.promote, stale.outcome) == (False, "stale") and "moved from v4 to v3" in stale.reason
    assert review_verdict(response(APPROVE), 5, None, 4).outcome == "stale"
    for odd in ([APPROVE, REJECT], ["Maybe"], []):
        verdict = review_verdict({**response(APPROVE), "chosen_options": odd}, 5, 4, 4)
        assert (verdict.promote, verdict.outcome) == (False, "rejected")


def score(qid: str, composite: float, answer: str, guard: bool = False) -> dict:
    return {"id": qid, "composite": composite, "answer": answer, "guard": guard, "relevance": composite,
            "completeness": composite, "key_data_accuracy": composite, "semantic_consistency": composite,
            "readability": composite, "answer_length": len(answer.split())}


def side(label: str, scores: list[dict]) -> dict:
    summary = {k: 5.0 for k in ("composite", "relevance", "completeness", "key_data_accuracy", "semantic_consistency",
                                "readability")}
    return {"label": label, "scores": scores, "summary": {**summary, "latency_p50_s": 1.0, "latency_p95_s": 1.2,
                                                          "tokens_per_s": 10.0, "answer_words": 20}}


def test_review_body_shows_scorecard_intervals_guards_and_the_answers_that_changed_most():
    before = [score("h1", 5.0, "Dry them at 20 °C."), score("h2", 4.0, "No idea | maybe"),
              score("h3", 6.0, "Same answer"), score("g1", 7.0, "Never mix bleach and vinegar.", guard=True)]
    after = [score("h1", 5.5, "Dry them at 20–30 °C away from heat."), score("h2", 8.0, "Use a <b>fan</b> and rice"),
             score("h3", 6.0, "Same answer"), score("g1", 6.5, "Mix bleach with vinegar.", guard=True)]
    evaluation = {"champion": side("v4", before), "challenger": side("challenger", after), "guard_ids": ["g1"],
                  "decoding": {"max_new_tokens": 64}, "holdout_hash": "abc123def456789", "scorer": "v3"}
    numbers = {"mean_diff": 1.5, "ci_low": 0.2, "ci_high": 2.8, "confidence": 0.95, "n_questions": 3,
               "min_effect": 0.1, "key_data_diff": 0.1, "key_data_ci_low": -0.3, "key_data_ci_high": 0.5,
               "key_data_margin": 0.5, "guard_claims_lost": {"g1": ["never mix bleach"]},
               "forbidden_claims": {"g1": ["mix bleach and vinegar"]}}
    body = review_body(evaluation, {"promote": True, "reasons": ["composite gain +1.500"], "numbers": numbers}, 5,
                       {"h2": "How do I dry wet boots?", "h1": "What temperature?"}, rows=2)
    assert "Challenger v5 vs v4" in body and "**Gate: PROMOTE**" in body and "composite gain +1.500" in body
    assert "composite: +1.500, 95% CI [+0.200, +2.800] over 3 holdout questions" in body
    assert "key-data accuracy: +0.100, 95% CI [-0.300, +0.500]" in body
    assert "| g1 | 7.00 | 6.50 | never mix bleach | mix bleach and vinegar |" in body
    changed = body.split("answers that changed most")[1]
    rows = [ln for ln in changed.splitlines() if ln.startswith("| **")]
    assert [r.split("**")[1] for r in rows] == ["h2", "g1"]  # |+4.0|, then the tie of |0.5| broken by id
    assert "How do I dry wet boots?" in rows[0] and "No idea \\| maybe (4.00)" in rows[0]
    assert "Use a &lt;b>fan&lt;/b> and rice (8.00)" in rows[0]  # answers stay text, one cell each
