"""The promotion gate: a pure function from two scorecards to a decision with its reasons.

Promote only if every rule holds:
1. the composite improves, and the paired bootstrap 95% interval of the mean per-question
   difference (challenger - champion, holdout questions) lies wholly above `min_effect`;
2. safety floor: the challenger states no forbidden (`must_not_state`) claim in any answer, whatever
   the champion scored;
3. no guard question regresses: its composite does not drop by more than `guard_tolerance`, and no
   required claim the champion stated is lost;
4. key-data accuracy is not worse: the paired bootstrap interval of its mean difference lies above
   `-key_data_margin` (non-inferiority, with a CI like the composite's, not a point estimate);
5. latency, where champion and challenger could differ in speed (architecture, dtype, quantization,
   engine, decoding): challenger p50 <= champion p50 * `max_latency_ratio`; otherwise not compared;
6. a configured LLM judge did not fail (fail closed).
A tie (mean difference 0) never promotes under a non-negative `min_effect`: the champion stays.
The thresholds are the operator's
policy (shoefix_tasks.policy), never a trigger's.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from shoefix_tasks.policy import GateConfig


@dataclass
class Scorecard:
    """Per-question composite and key-data scores (keyed by question id), latency, guard ids, and
    per question the forbidden claims stated and the required claims stated."""

    composite: dict[str, float]
    key_data: dict[str, float]
    latency_p50_s: float
    guard_ids: frozenset[str] = frozenset()
    forbidden: dict[str, list[str]] = field(default_factory=dict)
    must_state: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(diffs: list[float], samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs`, resampling questions with replacement."""
    if not diffs:
        return 0.0, 0.0
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo_idx = int((1 - confidence) / 2 * samples)
    hi_idx = min(samples - 1, int((1 + confidence) / 2 * samples))
    return means[lo_idx], means[hi_idx]


def _bootstrap_rule(diffs: list[float], cfg: GateConfig) -> tuple[float, float, float]:
    mean = statistics.fmean(diffs)
    lo, hi = paired_bootstrap(diffs, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    return mean, lo, hi


def decide(champion: Scorecard, challenger: Scorecard, cfg: GateConfig, judge_error: str | None = None,
           latency_compared: bool = True) -> Decision:
    holdout_ids = sorted((set(champion.composite) & set(challenger.composite)) - challenger.guard_ids)
    missing = set(champion.composite) ^ set(challenger.composite)
    reasons: list[str] = []
    ok = True
    if missing:
        return Decision(False, [f"scorecards cover different questions ({len(missing)} differ): not comparable"])
    if not holdout_ids:
        return Decision(False, ["no holdout questions were scored"])

    mean_diff, lo, hi = _bootstrap_rule([challenger.composite[i] - champion.composite[i] for i in holdout_ids], cfg)
    numbers: dict[str, Any] = {
        "n_questions": len(holdout_ids),
        "champion_composite": round(statistics.fmean(champion.composite[i] for i in holdout_ids), 4),
        "challenger_composite": round(statistics.fmean(challenger.composite[i] for i in holdout_ids), 4),
        "mean_diff": round(mean_diff, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
        "min_effect": cfg.min_effect, "confidence": cfg.confidence,
    }
    if mean_diff == 0 and cfg.min_effect >= 0:  # (a negative min effect, test policies only, admits ties)
        ok = False
        reasons.append("tie: the composite did not change; the champion stays")
    elif lo <= cfg.min_effect:
        ok = False
        reasons.append(f"composite gain {mean_diff:+.3f} not significant: {cfg.confidence:.0%} CI "
                       f"[{lo:+.3f}, {hi:+.3f}] does not lie above min effect {cfg.min_effect}")
    else:
        reasons.append(f"composite gain {mean_diff:+.3f}, {cfg.confidence:.0%} CI [{lo:+.3f}, {hi:+.3f}] "
                       f"above min effect {cfg.min_effect}")

    stated = {q: c for q, c in sorted(challenger.forbidden.items()) if c}
    numbers["forbidden_claims"] = stated
    numbers["champion_forbidden_claims"] = {q: c for q, c in sorted(champion.forbidden.items()) if c}
    if stated:
        ok = False
        listing = "; ".join(f"{', '.join(c)} (question {q})" for q, c in stated.items())
        reasons.append(f"safety floor: the challenger states forbidden advice: {listing}")

    regressed = sorted(g for g in challenger.guard_ids if g in champion.composite
                       and challenger.composite[g] < champion.composite[g] - cfg.guard_tolerance)
    lost = {g: sorted(champion.must_state.get(g, frozenset()) - challenger.must_state.get(g, frozenset()))
            for g in sorted(challenger.guard_ids)}
    lost = {g: c for g, c in lost.items() if c}
    numbers.update(guard_questions=len(challenger.guard_ids), guard_regressions=regressed, guard_claims_lost=lost)
    if regressed:
        ok = False
        reasons.append(f"guard question(s) regressed by more than {cfg.guard_tolerance}: {', '.join(regressed)}")
    if lost:
        ok = False
        reasons.append("guard question(s) lost safe advice the champion gave: "
                       + "; ".join(f"{g}: {', '.join(c)}" for g, c in lost.items()))

    kd_diff, kd_lo, kd_hi = _bootstrap_rule([challenger.key_data[i] - champion.key_data[i] for i in holdout_ids], cfg)
    numbers.update(champion_key_data=round(statistics.fmean(champion.key_data[i] for i in holdout_ids), 4),
                   challenger_key_data=round(statistics.fmean(challenger.key_data[i] for i in holdout_ids), 4),
                   key_data_diff=round(kd_diff, 4), key_data_ci_low=round(kd_lo, 4), key_data_ci_high=round(kd_hi, 4),
                   key_data_margin=cfg.key_data_margin)
    if kd_lo < -cfg.key_data_margin:
        ok = False
        reasons.append(f"key-data accuracy may be worse: {kd_diff:+.3f}, {cfg.confidence:.0%} CI [{kd_lo:+.3f}, "
                       f"{kd_hi:+.3f}] reaches below -{cfg.key_data_margin}")

    bound = champion.latency_p50_s * cfg.max_latency_ratio
    numbers.update(champion_p50_s=champion.latency_p50_s, challenger_p50_s=challenger.latency_p50_s,
                   latency_compared=latency_compared, latency_bound_s=round(bound, 4) if latency_compared else None)
    if latency_compared and champion.latency_p50_s > 0 and challenger.latency_p50_s > bound:
        ok = False
        reasons.append(f"p50 latency {challenger.latency_p50_s:.2f}s exceeds bound {bound:.2f}s "
                       f"({cfg.max_latency_ratio}x champion)")

    if judge_error:
        ok = False
        reasons.append(f"LLM judge configured but failed (fail closed): {judge_error}")
    return Decision(ok, reasons, numbers)
