"""The benchmark's quality verdict ("the same as transformers fp32") on the intervals and the per-question
differences it must rank right."""

import json
import random
from pathlib import Path

import pytest

from benchmarks.cpu_latency import equivalent, within_min_effect


@pytest.mark.parametrize(("lo", "hi", "same"), [
    (-0.05, 0.08, True),     # inside the gate's minimum effect on both sides
    (-0.1, 0.1, False),      # on the bound: a p-value of exactly the level, not rejected
    (-0.099, 0.099, True),   # just inside
    (-0.191, 0.073, False),  # a loss of up to 0.19 is not excluded
    (-0.102, 0.112, False),  # just over on both sides
    (0.2, 0.4, False),       # clearly better is still not "the same"
    (-0.6, -0.3, False),     # clearly worse
])
def test_quality_verdict(lo, hi, same):
    assert within_min_effect(lo, hi, 0.1) is same


def _diffs(shift: float, spread: float, n: int = 45, seed: int = 3) -> list[float]:
    rng = random.Random(seed)
    return [shift + rng.gauss(0, spread) for _ in range(n)]


@pytest.mark.parametrize(("diffs", "same"), [
    ([0.0] * 45, True),                            # the same answers
    (_diffs(0.0, 0.15), True),                     # noise only, 45 questions
    (_diffs(-0.3, 0.15), False),                   # a real loss (wrong facts in answers)
    (_diffs(+0.3, 0.15), False),                   # a real gain is not "the same" either
    (_diffs(0.0, 1.0), False),                     # too noisy to tell: not shown the same
    (_diffs(-0.06, 0.45), False),                  # like the runtime LoRA's run: a loss of 0.17 not excluded
])
def test_equivalence_on_differences(diffs, same):
    verdict = equivalent(diffs, 0.1)
    assert verdict["within_min_effect"] is same, verdict
    lo95, hi95 = verdict["ci"]
    lo90, hi90 = verdict["tost_ci90"]
    assert lo95 <= lo90 <= verdict["diff"] <= hi90 <= hi95  # the 90% interval nests inside the 95%


def test_the_90_percent_interval_decides_where_the_two_rules_differ():
    """The merged file's 45 per-question differences against transformers fp32 (docs/benchmark-logs): the
    95% interval pokes out of +-0.1 on both sides, the 90% interval (TOST) lies inside. The verdict must
    follow the 90% interval; the runtime LoRA's differences fail either way."""
    log = Path(__file__).resolve().parents[2] / "docs" / "benchmark-logs" / "cpu-quality-2026-12-06.json"
    answers = json.loads(log.read_text())["quality"]["answers"]
    ref = answers["hf-fp32"]
    diffs = {name: [a["composite"] - b["composite"] for a, b in zip(rows, ref, strict=True)]
             for name, rows in answers.items() if name != "hf-fp32"}
    merged = equivalent(diffs["llama-merged-q8_0"], 0.1)
    assert not within_min_effect(*merged["ci"], 0.1) and merged["within_min_effect"], merged
    assert not equivalent(diffs["llama-adapter-t1"], 0.1)["within_min_effect"]
