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
from shoefix_tasks.records import load_eval_set, rows_hash

log = logging.getLogger(__name__)


def eval_items(settings: Settings, recipe: Recipe) -> tuple[list[dict[str, Any]], set[str], str]:
    """(items, guard ids, holdout+guard hash) for the recipe's evaluation languages."""
    holdout = load_eval_set(settings.data_dir, "holdout", recipe.eval.languages)
    if recipe.eval.max_questions:
        holdout = holdout[: recipe.eval.max_questions]
    guard = load_eval_set(settings.data_dir, "guard", recipe.eval.languages) if recipe.eval.include_guard else []
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
    latency = measure_latency(ans, [it["question"] for it in items[: ev.latency_samples]], ev.max_new_tokens,
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


def evaluate(settings: Settings, recipe: Recipe, run_key: str, challenger_adapter: Path,
             champion_adapter: Path | None, champion_label: str, training_run_id: str,
             judge=None) -> dict[str, Any]:
    """Score both models; log everything to an `evaluate` MLflow run; return a small reference."""
    import mlflow

    from shoefix_tasks import tracking

    tracking.configure(settings)
    items, guard_ids, eval_hash = eval_items(settings, recipe)
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
