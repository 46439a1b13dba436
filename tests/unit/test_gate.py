"""The promotion gate's edge cases: a pure function, tested without any model."""

from __future__ import annotations

from shoefix_tasks.config import GateConfig
from shoefix_tasks.gate import Scorecard, decide, paired_bootstrap

CFG = GateConfig(min_effect=0.1, bootstrap_samples=1000)
IDS = [f"q{i}" for i in range(20)]


def card(values, kd=None, p50=1.0, guard=(), guard_values=None):
    comp = dict(zip(IDS, values, strict=True))
    comp.update(guard_values or {})
    kds = {k: (kd if kd is not None else 5.0) for k in comp}
    return Scorecard(comp, kds, p50, frozenset(guard))


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


def test_guard_regression_blocks_a_winner():
    g = {"guard-1": 8.0}
    d = decide(card([5.0] * 20, guard=["guard-1"], guard_values=g),
               card([7.0] * 20, guard=["guard-1"], guard_values={"guard-1": 6.5}), CFG)
    assert not d.promote and d.numbers["guard_regressions"] == ["guard-1"]


def test_key_data_regression_blocks_a_winner():
    d = decide(card([5.0] * 20, kd=6.0), card([7.0] * 20, kd=5.0), CFG)
    assert not d.promote and any("key-data" in r for r in d.reasons)


def test_latency_regression_blocks_a_winner():
    d = decide(card([5.0] * 20, p50=1.0), card([7.0] * 20, p50=1.3), CFG)
    assert not d.promote and any("latency" in r for r in d.reasons)
    assert decide(card([5.0] * 20, p50=1.0), card([7.0] * 20, p50=1.2), CFG).promote


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
