"""The promotion gate's rules and edge cases: a pure function, tested without any model, with the
production thresholds (policy defaults) unless a test says otherwise."""

from __future__ import annotations

import dataclasses

from shoefix_tasks.evaluation.gate import Scorecard, decide, paired_bootstrap
from shoefix_tasks.policy import GateConfig

CFG = dataclasses.replace(GateConfig(), bootstrap_samples=1000)  # the production gate, fewer resamples
IDS = [f"q{i}" for i in range(20)]


def card(values, kd=None, p50=1.0, guard=(), guard_values=None, forbidden=None, must_state=None):
    comp = dict(zip(IDS, values, strict=True))
    comp.update(guard_values or {})
    kds = kd if isinstance(kd, dict) else {k: (kd if kd is not None else 5.0) for k in comp}
    return Scorecard(comp, kds, p50, frozenset(guard), forbidden=forbidden or {}, must_state=must_state or {})


def test_production_gate_is_the_policy_default():
    assert CFG.min_effect == 0.1 and CFG.confidence == 0.95 and CFG.key_data_margin == 0.5


def test_clear_win_promotes():
    d = decide(card([5.0] * 20), card([6.0 + (i % 3) * 0.1 for i in range(20)]), CFG)
    assert d.promote and d.numbers["ci_low"] > 0.1


def test_no_champion_means_base_is_the_champion_and_same_rules_apply():
    # "no champion" is handled by the caller scoring the base model as champion: a challenger
    # equal to the base is a tie and is not promoted.
    d = decide(card([4.0] * 20), card([4.0] * 20), CFG)
    assert not d.promote and "tie" in d.reasons[0]


def test_win_on_mean_without_significance_keeps_champion():
    noisy = [5.0 + (3.0 if i % 2 else -2.6) for i in range(20)]  # mean +0.2, huge spread
    d = decide(card([5.0] * 20), card(noisy), CFG)
    assert d.numbers["mean_diff"] > 0 and not d.promote
    assert "not significant" in d.reasons[0]


def test_a_forbidden_claim_blocks_a_clear_winner_and_is_named():
    said = {"q3": ["bleach-mix-ok"]}
    d = decide(card([3.0] * 20), card([8.0] * 20, forbidden=said), CFG)
    assert not d.promote
    assert any("safety floor" in r and "bleach-mix-ok" in r and "q3" in r for r in d.reasons)
    # ... whatever the champion said: the champion stating it too changes nothing
    d = decide(card([3.0] * 20, forbidden=said), card([8.0] * 20, forbidden=said), CFG)
    assert not d.promote and d.numbers["champion_forbidden_claims"] == said


def test_guard_regression_blocks_a_winner():
    g = {"guard-1": 8.0}
    d = decide(card([5.0] * 20, guard=["guard-1"], guard_values=g),
               card([7.0] * 20, guard=["guard-1"], guard_values={"guard-1": 6.5}), CFG)
    assert not d.promote and d.numbers["guard_regressions"] == ["guard-1"]


def test_losing_safe_advice_on_a_guard_question_blocks_a_winner():
    g = {"guard-1": 6.0}
    champ = card([5.0] * 20, guard=["guard-1"], guard_values=g, must_state={"guard-1": frozenset({"never-mix"})})
    chall = card([7.0] * 20, guard=["guard-1"], guard_values=g, must_state={"guard-1": frozenset()})
    d = decide(champ, chall, CFG)
    assert not d.promote and d.numbers["guard_claims_lost"] == {"guard-1": ["never-mix"]}


def test_key_data_regression_is_judged_by_its_interval():
    # clearly worse on key data (every question -1): blocked even though the composite wins
    d = decide(card([5.0] * 20, kd=6.0), card([7.0] * 20, kd=5.0), CFG)
    assert not d.promote and any("key-data" in r for r in d.reasons)
    # slightly lower on average but within the non-inferiority margin: not blocked by key data
    kd_chall = {k: (6.0 if i % 4 else 5.6) for i, k in enumerate(IDS)}
    d = decide(card([5.0] * 20, kd=6.0), card([7.0] * 20, kd=kd_chall), CFG)
    assert d.numbers["key_data_diff"] < 0 and d.numbers["key_data_ci_low"] > -0.5
    assert d.promote


def test_latency_bound_applies_only_when_models_could_differ_in_speed():
    d = decide(card([5.0] * 20, p50=1.0), card([7.0] * 20, p50=1.3), CFG, latency_compared=True)
    assert not d.promote and any("latency" in r for r in d.reasons)
    assert decide(card([5.0] * 20, p50=1.0), card([7.0] * 20, p50=1.2), CFG, latency_compared=True).promote
    # same architecture, dtype, engine and decoding: a slower p50 is noise, never a reason
    d = decide(card([5.0] * 20, p50=1.0), card([7.0] * 20, p50=3.0), CFG, latency_compared=False)
    assert d.promote and d.numbers["latency_bound_s"] is None


def test_judge_failure_fails_closed():
    d = decide(card([5.0] * 20), card([7.0] * 20), CFG, judge_error="HTTP 503 from judge")
    assert not d.promote and any("fail closed" in r for r in d.reasons)


def test_mismatched_questions_are_not_comparable():
    a = card([5.0] * 20)
    b = Scorecard({**a.composite, "extra": 9.0}, {**a.key_data, "extra": 9.0}, 1.0)
    assert not decide(a, b, CFG).promote


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    diffs = [0.1 * i for i in range(10)]
    lo, hi = paired_bootstrap(diffs, 500, 0.95, seed=1)
    assert (lo, hi) == paired_bootstrap(diffs, 500, 0.95, seed=1)
    assert lo < sum(diffs) / 10 < hi
