"""The operator's policy: what a challenger must show to be promoted, how it is evaluated, what a
trigger may ask for, whether a person approves each promotion, and when a run counts as late.

A recipe says how to *train*; the policy says what counts as *better*. They are kept apart because
whoever triggers a run chooses the recipe: if a recipe (or a trigger's overrides) could carry gate
thresholds, guard settings or evaluation sizes, anyone allowed to press "Trigger" could promote a worse
model. The policy comes only from server-side configuration: the built-in defaults below (production),
or the YAML file named by `SHOEFIX_POLICY` on the machines that run the tasks and the api-server
(tests and benchmarks point it at a lenient file of their own). Unknown keys are errors.

No heavy imports: DAG files read the policy at parse time (the recipe names a trigger may choose).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

POLICY_ENV = "SHOEFIX_POLICY"


@dataclass(frozen=True)
class GateConfig:
    """Promotion rules (shoefix_tasks.evaluation.gate). Composite points are on the 1-10 scale."""

    min_effect: float = 0.1  # the composite gain's CI lower bound must exceed this
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    # Latency bound, applied only when champion and challenger differ in something that can change
    # speed (architecture, dtype, quantization, engine, decoding): challenger p50 / champion p50.
    max_latency_ratio: float = 1.25
    guard_tolerance: float = 1.0  # a guard question "regresses" if its composite drops more than this
    # Non-inferiority margin for key-data accuracy: the CI lower bound of the mean per-question
    # difference (challenger - champion) must lie above -key_data_margin.
    key_data_margin: float = 0.5
    seed: int = 8888

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1:
            raise ValueError("gate.confidence must be in (0.5, 1)")
        if self.max_latency_ratio <= 0:
            raise ValueError("gate.max_latency_ratio must be positive")
        if self.bootstrap_samples < 100:
            raise ValueError("gate.bootstrap_samples must be >= 100")
        if self.guard_tolerance < 0 or self.key_data_margin < 0:
            raise ValueError("gate.guard_tolerance and gate.key_data_margin must be >= 0")


@dataclass(frozen=True)
class EvalPolicy:
    """How big an evaluation is. The guard set is always evaluated in full (safety floor)."""

    latency_samples: int = 10  # timed answers per model, champion and challenger interleaved
    latency_warmup: int = 1  # untimed answers per model first (compilation, caches)
    quick_questions: int = 20  # a `quick` evaluation: a seeded sample of the holdout, stratified by topic
    quick_seed: int = 8888
    # max_new_tokens must cover the longest evaluated reference answer, in the base's tokens, times this
    token_margin: float = 1.25

    def __post_init__(self) -> None:
        if self.latency_samples < 10:
            raise ValueError("evaluation.latency_samples must be >= 10 (a p50 of fewer is noise)")
        if self.latency_warmup < 1:
            raise ValueError("evaluation.latency_warmup must be >= 1")
        if self.quick_questions < 5:
            raise ValueError("evaluation.quick_questions must be >= 5 (one per topic)")
        if self.token_margin < 1.0:
            raise ValueError("evaluation.token_margin must be >= 1")


@dataclass(frozen=True)
class TriggerPolicy:
    """What a DAG run's conf may ask for (checked by the api-server and again by the tasks)."""

    # Folders a recipe *name* is looked up in, besides shoefix_tasks/recipes (a trigger never gives a path).
    recipe_dirs: tuple[str, ...] = ()
    # Roots an `inbox` param may point inside, besides the configured inbox ($SHOEFIX_INBOX).
    inbox_roots: tuple[str, ...] = ()
    allow_quick: bool = True  # may an urgent run ask for the quick evaluation?
    max_quarantine_rate: float = 0.5  # fail the run if more of its batch is quarantined


PROMOTION_MODES = ("auto", "review")


@dataclass(frozen=True)
class PromotionPolicy:
    """Who moves `champion` once the gate passes: the pipeline itself (`auto`), or a person who
    approves it in Airflow's human-in-the-loop task (`review`). A review that gets no answer within
    `review_timeout_hours` keeps the champion (fail closed), as a rejection does."""

    mode: str = "auto"
    review_timeout_hours: float = 72.0  # a long weekend: Friday's run can wait until Monday

    def __post_init__(self) -> None:
        if self.mode not in PROMOTION_MODES:
            raise ValueError(f"promotion.mode must be one of {list(PROMOTION_MODES)}, got {self.mode!r}")
        if not self.review_timeout_hours > 0:
            raise ValueError("promotion.review_timeout_hours must be positive")


def stricter_mode(configured: str, asked: str | None) -> str:
    """The promotion mode a run uses: `review` if either the policy or the run asked for it. A run can
    only tighten the policy (ask for a person), never loosen it; ops/trigger.py refuses the attempt."""
    return "review" if "review" in (configured, asked) else "auto"


@dataclass(frozen=True)
class AlertPolicy:
    """When a run counts as late. A weekly run on the CPU recipe takes minutes and a GPU run about an
    hour; one still going after this many hours since it was queued is stuck or starved, and someone
    should look (the weekly DAG's deadline alert notifies through shoefix_notify)."""

    late_after_hours: float = 6.0

    def __post_init__(self) -> None:
        if not self.late_after_hours > 0:
            raise ValueError("alerts.late_after_hours must be positive")


@dataclass(frozen=True)
class Policy:
    gate: GateConfig = field(default_factory=GateConfig)
    evaluation: EvalPolicy = field(default_factory=EvalPolicy)
    trigger: TriggerPolicy = field(default_factory=TriggerPolicy)
    promotion: PromotionPolicy = field(default_factory=PromotionPolicy)
    alerts: AlertPolicy = field(default_factory=AlertPolicy)
    source: str = "built-in"  # where it was read from (recorded with every decision)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    @property
    def digest(self) -> str:
        """Content hash of the policy, recorded with each evaluation and decision."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


_SECTIONS = {"gate": GateConfig, "evaluation": EvalPolicy, "trigger": TriggerPolicy, "promotion": PromotionPolicy,
             "alerts": AlertPolicy}


def _section(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown key(s) in policy section {where!r}: {sorted(unknown)}; known: {sorted(fields)}")
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return cls(**values)


def policy_from_dict(data: dict[str, Any] | None, source: str = "built-in") -> Policy:
    data = dict(data or {})
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"unknown policy section(s) {sorted(unknown)}; known: {sorted(_SECTIONS)}")
    return Policy(**{k: _section(cls, data.get(k), k) for k, cls in _SECTIONS.items()}, source=source)


def load_policy() -> Policy:
    """The policy in force: `$SHOEFIX_POLICY` (a YAML file) if set, else the built-in defaults."""
    path = os.environ.get(POLICY_ENV, "").strip()
    if not path:
        return Policy()
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{POLICY_ENV}={path}: no such policy file")
    return policy_from_dict(yaml.safe_load(file.read_text()) or {}, source=str(file.resolve()))
