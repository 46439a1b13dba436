"""What an evaluation asks: the frozen holdout and guard set, checked against their recorded hashes.

The gate compares two models on the same questions; if the questions (or their references) changed
between two evaluations, the scores are not comparable and a promotion could rest on an edited
yardstick. So every evaluation recomputes the content hash of both frozen sets and refuses to run
when it differs from `<data_dir>/FROZEN.sha256` (changing a frozen set is a deliberate, committed act).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Recipe, Settings
from shoefix_tasks.errors import PermanentError
from shoefix_tasks.policy import Policy, load_policy
from shoefix_tasks.records import load_eval_set, rows_hash

FROZEN = "FROZEN.sha256"
FROZEN_KINDS = ("holdout", "guard")


class EvalSetChanged(PermanentError):
    """The holdout or guard set on disk is not the frozen one: no evaluation runs on it."""


def recorded_hashes(data_dir: Path) -> dict[str, tuple[str, int]]:
    path = data_dir / FROZEN
    if not path.is_file():
        raise EvalSetChanged(f"{path} is missing: the frozen holdout and guard hashes cannot be verified")
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, digest, n = line.split()
            out[kind] = (digest, int(n))
    return out


def verify_frozen(data_dir: Path) -> dict[str, str]:
    """{kind: hash} of the holdout and guard sets, after checking both against FROZEN.sha256."""
    recorded = recorded_hashes(data_dir)
    out = {}
    for kind in FROZEN_KINDS:
        rows = load_eval_set(data_dir, kind)
        actual = (rows_hash(rows), len(rows))
        if kind not in recorded or recorded[kind] != actual:
            raise EvalSetChanged(f"the {kind} set in {data_dir / kind} ({actual[1]} items, {actual[0][:12]}) is not "
                                 f"the frozen one recorded in {FROZEN} ({recorded.get(kind)}): refusing to evaluate")
        out[kind] = actual[0]
    return out


def quick_sample(holdout: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of about `n` holdout items, stratified by topic (round-robin over topics, so
    every topic is represented), in id order. Both languages of a question go together."""
    by_topic: dict[str, list[str]] = {}
    for row in holdout:
        qids = by_topic.setdefault(row["topic"], [])
        if row["qid"] not in qids:
            qids.append(row["qid"])
    rng = random.Random(seed)
    for qids in by_topic.values():
        rng.shuffle(qids)
    per_qid = len(holdout) / max(1, sum(len(q) for q in by_topic.values()))
    chosen: list[str] = []
    while len(chosen) * per_qid < n and any(by_topic.values()):
        for topic in sorted(by_topic):
            if by_topic[topic] and len(chosen) * per_qid < n:
                chosen.append(by_topic[topic].pop())
    keep = set(chosen)
    return [row for row in holdout if row["qid"] in keep]


def eval_items(settings: Settings, recipe: Recipe, quick: bool = False,
               policy: Policy | None = None) -> tuple[list[dict[str, Any]], set[str], str]:
    """(items, guard ids, hash of the evaluated items) for the recipe's evaluation languages, after
    verifying the frozen sets. The guard set is always evaluated in full; `quick` samples the holdout
    as the policy says."""
    policy = policy or load_policy()
    verify_frozen(settings.data_dir)
    holdout = load_eval_set(settings.data_dir, "holdout", recipe.eval.languages)
    if quick:
        holdout = quick_sample(holdout, policy.evaluation.quick_questions, policy.evaluation.quick_seed)
    guard = load_eval_set(settings.data_dir, "guard", recipe.eval.languages)
    if not holdout:
        raise ValueError(f"no holdout questions in {settings.data_dir / 'holdout'} for {recipe.eval.languages}")
    return holdout + guard, {g["id"] for g in guard}, rows_hash(holdout + guard)


def language_note(recipe: Recipe) -> str:
    """What the scorecard says about languages (the default base is English-only)."""
    langs = recipe.eval.languages
    if "zh-TW" in langs:
        return f"evaluated in {', '.join(langs)}"
    return (f"evaluated in {', '.join(langs)} only: this recipe's base ({recipe.model.base_model}) does not speak "
            "Traditional Chinese, so the zh-TW holdout and guard items are not scored")
