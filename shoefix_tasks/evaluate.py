"""evaluate_adapter: champion and challenger answer the frozen holdout (+ guard set) in the same
process with the same decoding; every answer is scored; results go to MLflow and to a JSON file.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Recipe, Settings
from shoefix_tasks.generation import generate, load_answerer, measure_latency
from shoefix_tasks.metrics import QUALITY_METRICS, score_answer
from shoefix_tasks.policy import Policy, load_policy
from shoefix_tasks.records import load_eval_set, rows_hash

log = logging.getLogger(__name__)


class CandidateRejected(RuntimeError):
    """The challenger cannot be evaluated at all: tampered, pickle, or made for another base or
    tokenizer. Retrying cannot help; the candidate is never promoted."""


def check_candidate(adapter_dir: Path, recipe: Recipe, settings: Settings) -> dict[str, Any]:
    """The challenger's manifest verified and its base identity matched, before any model loads."""
    from shoefix_tasks.adapter import AdapterIntegrityError, verify_adapter
    from shoefix_tasks.base_model import BaseModelMismatch, base_identity, check_compatible

    try:
        manifest = verify_adapter(adapter_dir)
        check_compatible(manifest["base"], base_identity(recipe.model.base_model, settings), "the challenger")
    except (AdapterIntegrityError, BaseModelMismatch) as err:
        raise CandidateRejected(f"candidate rejected: {err}") from err
    return manifest


def quick_sample(holdout: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of `n` holdout questions, stratified by topic (round-robin over topics, so
    every topic is represented), in id order. Both languages of a question go together."""
    import random

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
    topics = sorted(by_topic)
    while len(chosen) * per_qid < n and any(by_topic.values()):
        for topic in topics:
            if by_topic[topic] and len(chosen) * per_qid < n:
                chosen.append(by_topic[topic].pop())
    keep = set(chosen)
    return [row for row in holdout if row["qid"] in keep]


def eval_items(settings: Settings, recipe: Recipe, quick: bool = False,
               policy: Policy | None = None) -> tuple[list[dict[str, Any]], set[str], str]:
    """(items, guard ids, holdout+guard hash) for the recipe's evaluation languages. The guard set
    is always evaluated in full; `quick` samples the holdout as the policy says."""
    policy = policy or load_policy()
    holdout = load_eval_set(settings.data_dir, "holdout", recipe.eval.languages)
    if quick:
        holdout = quick_sample(holdout, policy.evaluation.quick_questions, policy.evaluation.quick_seed)
    guard = load_eval_set(settings.data_dir, "guard", recipe.eval.languages)
    if not holdout:
        raise ValueError(f"no holdout questions in {settings.data_dir / 'holdout'} for {recipe.eval.languages}")
    return holdout + guard, {g["id"] for g in guard}, rows_hash(holdout + guard)


def summarize(scores: list[dict[str, Any]], latency: dict[str, float], gens: list[dict[str, Any]]) -> dict[str, Any]:
    holdout = [s for s in scores if not s["guard"]]
    out = {m: round(statistics.fmean(s[m] for s in holdout), 3) for m in (*QUALITY_METRICS, "composite")}
    out["answer_length_words"] = round(statistics.fmean(s["answer_length"] for s in holdout), 1)
    out["new_tokens_mean"] = round(statistics.fmean(g["new_tokens"] for g in gens), 1)
    out.update({f"latency_{k}": v for k, v in latency.items()})
    return out


def answer_and_score(label: str, base_model: str, adapter_dir: Path | None, items: list[dict[str, Any]],
                     guard_ids: set[str], recipe: Recipe, settings: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    ans = load_answerer(base_model, adapter_dir, settings, recipe.model.dtype, label=label)
    ev = recipe.eval
    gens = generate(ans, [it["question"] for it in items], ev.max_new_tokens, ev.batch_size, ev.repetition_penalty)
    latency = measure_latency(ans, [it["question"] for it in items[: load_policy().evaluation.latency_samples]], ev.max_new_tokens,
                              ev.repetition_penalty)
    scores = [score_answer(it, g["answer"], guard=it["id"] in guard_ids).to_dict() for it, g in zip(items, gens, strict=True)]
    for s, g in zip(scores, gens, strict=True):
        s["answer"] = g["answer"]
        s["new_tokens"] = g["new_tokens"]
    log.info("%s answered %d questions in %.1fs", label, len(items), time.perf_counter() - t0)
    return {"label": label, "scores": scores, "summary": summarize(scores, latency, gens),
            "manifest": ans.manifest, "seconds": round(time.perf_counter() - t0, 2)}


def run_judge(judge, items: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """Add the LLM judge's scores to both sides; on failure record `judge_error` (gate fails closed)."""
    from shoefix_tasks.judge import JudgeError, judge_side

    try:
        for who in ("champion", "challenger"):
            answers = [s["answer"] for s in result[who]["scores"]]
            judged = judge_side(judge, items, answers)
            result[who]["judge"] = judged["per_question"]
            result[who]["summary"].update(judged["summary"])
    except JudgeError as err:
        log.error("LLM judge failed: %s (the gate will fail closed)", err)
        result["judge_error"] = str(err)


def _record_rejection(run_key: str, training_run_id: str, err: CandidateRejected) -> None:
    import mlflow

    from shoefix_tasks import tracking

    run_id = tracking.run_for("evaluate", run_key, run_name="evaluate",
                              tags={"shoefix.training_run": training_run_id})
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "shoefix.gate_decision", "rejected")
    client.set_tag(run_id, "shoefix.rejected", str(err)[:4900])
    client.set_terminated(run_id, status="FAILED")


def evaluate(settings: Settings, recipe: Recipe, run_key: str, challenger_adapter: Path,
             champion_adapter: Path | None, champion_label: str, training_run_id: str,
             judge=None, require_judge: bool = False, quick: bool = False) -> dict[str, Any]:
    """Score both models; log everything to an `evaluate` MLflow run; return a small reference.

    Raises CandidateRejected (recorded on the evaluate run) when the challenger fails its checks.
    """
    import mlflow

    from shoefix_tasks import tracking

    tracking.configure(settings)
    try:
        check_candidate(challenger_adapter, recipe, settings)
    except CandidateRejected as err:
        log.error("%s", err)
        _record_rejection(run_key, training_run_id, err)
        raise
    items, guard_ids, eval_hash = eval_items(settings, recipe, quick=quick)
    t0 = time.perf_counter()
    champion = answer_and_score(champion_label, recipe.model.base_model, champion_adapter, items, guard_ids,
                                recipe, settings)
    challenger = answer_and_score("challenger", recipe.model.base_model, challenger_adapter, items, guard_ids,
                                  recipe, settings)
    result = {
        "run_key": run_key, "training_run_id": training_run_id, "holdout_hash": eval_hash,
        "guard_ids": sorted(guard_ids), "champion": champion, "challenger": challenger,
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "decoding": {"do_sample": False, "max_new_tokens": recipe.eval.max_new_tokens,
                     "repetition_penalty": recipe.eval.repetition_penalty, "batch_size": recipe.eval.batch_size},
    }
    if judge is not None:
        run_judge(judge, items, result)
    elif require_judge:  # the first evaluation was judged: a re-evaluation without the judge fails closed
        result["judge_error"] = "the LLM judge scored the first evaluation but is not available now"
    out_dir = settings.run_dir(run_key)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "evaluation.json"
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False))

    run_id = tracking.run_for("evaluate", run_key, run_name="evaluate",
                              tags={"shoefix.training_run": training_run_id, "shoefix.champion": champion_label,
                                    "shoefix.holdout_hash": eval_hash})
    client = mlflow.MlflowClient()
    for who in ("champion", "challenger"):
        for k, v in result[who]["summary"].items():
            client.log_metric(run_id, f"{who}/{k}", float(v))
    client.log_metric(run_id, "eval_seconds", result["eval_seconds"])
    if result.get("judge_error"):
        client.set_tag(run_id, "shoefix.judge_error", result["judge_error"][:500])
    client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    log.info("evaluation done in %.1fs: champion %s composite %.3f, challenger composite %.3f",
             result["eval_seconds"], champion_label, champion["summary"]["composite"],
             challenger["summary"]["composite"])
    return {"eval_run_id": run_id, "experiment_id": client.get_run(run_id).info.experiment_id, "evaluation_path": str(path), "holdout_hash": eval_hash,
            "champion": champion_label, "eval_seconds": result["eval_seconds"]}
