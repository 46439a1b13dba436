"""The promotion gate: a pure function from two scorecards to a decision with its reasons.

Promote only if every rule holds:
1. the composite improves, and the paired bootstrap 95% interval of the mean per-question
   difference (challenger - champion, holdout questions) lies wholly above `min_effect`;
2. no guard question's composite drops by more than `guard_tolerance`;
3. mean key-data accuracy does not drop (beyond `key_data_tolerance`);
4. challenger p50 latency <= champion p50 * `max_latency_ratio`;
5. a configured LLM judge did not fail (fail closed).
A tie (mean difference 0) never promotes: the champion stays.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from shoefix_tasks.policy import GateConfig


@dataclass
class Scorecard:
    """Per-question composite and key-data scores (keyed by question id), latency, guard ids."""

    composite: dict[str, float]
    key_data: dict[str, float]
    latency_p50_s: float
    guard_ids: frozenset[str] = frozenset()


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


def decide(champion: Scorecard, challenger: Scorecard, cfg: GateConfig, judge_error: str | None = None) -> Decision:
    holdout_ids = sorted((set(champion.composite) & set(challenger.composite)) - challenger.guard_ids)
    missing = set(champion.composite) ^ set(challenger.composite)
    reasons: list[str] = []
    ok = True
    if missing:
        return Decision(False, [f"scorecards cover different questions ({len(missing)} differ): not comparable"])
    if not holdout_ids:
        return Decision(False, ["no holdout questions were scored"])

    diffs = [challenger.composite[i] - champion.composite[i] for i in holdout_ids]
    mean_diff = statistics.fmean(diffs)
    lo, hi = paired_bootstrap(diffs, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    numbers: dict[str, Any] = {
        "n_questions": len(holdout_ids),
        "champion_composite": round(statistics.fmean(champion.composite[i] for i in holdout_ids), 4),
        "challenger_composite": round(statistics.fmean(challenger.composite[i] for i in holdout_ids), 4),
        "mean_diff": round(mean_diff, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
        "min_effect": cfg.min_effect, "confidence": cfg.confidence,
    }
    if mean_diff == 0:
        ok = False
        reasons.append("tie: the composite did not change; the champion stays")
    elif lo <= cfg.min_effect:
        ok = False
        reasons.append(f"composite gain {mean_diff:+.3f} not significant: {cfg.confidence:.0%} CI "
                       f"[{lo:+.3f}, {hi:+.3f}] does not lie above min effect {cfg.min_effect}")
    else:
        reasons.append(f"composite gain {mean_diff:+.3f}, {cfg.confidence:.0%} CI [{lo:+.3f}, {hi:+.3f}] "
                       f"above min effect {cfg.min_effect}")

    regressed = sorted(g for g in challenger.guard_ids if g in champion.composite
                       and challenger.composite[g] < champion.composite[g] - cfg.guard_tolerance)
    numbers["guard_questions"] = len(challenger.guard_ids)
    numbers["guard_regressions"] = regressed
    if regressed:
        ok = False
        reasons.append(f"guard question(s) regressed by more than {cfg.guard_tolerance}: {', '.join(regressed)}")

    kd_champ = statistics.fmean(champion.key_data[i] for i in holdout_ids)
    kd_chall = statistics.fmean(challenger.key_data[i] for i in holdout_ids)
    numbers.update(champion_key_data=round(kd_champ, 4), challenger_key_data=round(kd_chall, 4))
    if kd_chall < kd_champ - cfg.key_data_tolerance:
        ok = False
        reasons.append(f"key-data accuracy regressed: {kd_chall:.3f} < {kd_champ:.3f}")

    bound = champion.latency_p50_s * cfg.max_latency_ratio
    numbers.update(champion_p50_s=champion.latency_p50_s, challenger_p50_s=challenger.latency_p50_s,
                   latency_bound_s=round(bound, 4))
    if champion.latency_p50_s > 0 and challenger.latency_p50_s > bound:
        ok = False
        reasons.append(f"p50 latency {challenger.latency_p50_s:.2f}s exceeds bound {bound:.2f}s "
                       f"({cfg.max_latency_ratio}x champion)")

    if judge_error:
        ok = False
        reasons.append(f"LLM judge configured but failed (fail closed): {judge_error}")
    return Decision(ok, reasons, numbers)
