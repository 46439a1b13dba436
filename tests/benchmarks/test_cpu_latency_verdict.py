"""The benchmark's quality verdict ("the same as transformers fp32") on the intervals it must rank right."""

import pytest

from benchmarks.cpu_latency import within_min_effect


@pytest.mark.parametrize(("lo", "hi", "same"), [
    (-0.05, 0.08, True),     # inside the gate's minimum effect on both sides
    (-0.1, 0.1, True),       # on the edge
    (-0.191, 0.073, False),  # the served engine's 45-question run: a loss of up to 0.19 is not excluded
    (-0.102, 0.112, False),  # just over on both sides
    (0.2, 0.4, False),       # clearly better is still not "the same"
    (-0.6, -0.3, False),     # clearly worse
])
def test_quality_verdict(lo, hi, same):
    assert within_min_effect(lo, hi, 0.1) is same
