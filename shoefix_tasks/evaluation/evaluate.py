"""evaluate_adapter: champion and challenger answer the frozen holdout (+ guard set) in the same
process with the same decoding; every answer is scored and checked for safety claims; latency is
measured interleaved; results go to MLflow and to a JSON file.

Each model is opened as it serves (model/engines.py: llama.cpp for a base that ships as a GGUF, with
the adapter merged in exactly as registration derives it; transformers otherwise): the champion with its registered base and dtype,
the challenger with its recipe's, so scores and the latency bound are about what production runs. Answers get enough new tokens to cover the longest reference (policy
`evaluation.token_margin`), so nobody is scored on an answer cut short.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Recipe, Settings
from shoefix_tasks.errors import PermanentError
from shoefix_tasks.evaluation.evalset import EvalSetChanged, eval_items, language_note
from shoefix_tasks.evaluation.metrics import QUALITY_METRICS
from shoefix_tasks.model.engines import FORM_MERGED, answer_each, open_engine
from shoefix_tasks.model.generation import measure_latency_interleaved
from shoefix_tasks.policy import Policy, load_policy

log = logging.getLogger(__name__)
SCORER = "scorecard-v2"  # recorded with every evaluation: scores of different scorers never mix


class CandidateRejected(PermanentError):
    """The challenger cannot be evaluated at all: tampered, pickle, or made for another base or
    tokenizer. Retrying cannot help; the candidate is never promoted."""


def check_candidate(adapter_dir: Path, recipe: Recipe, settings: Settings) -> dict[str, Any]:
    """The challenger's manifest verified and its base identity matched, before any model loads."""
    from shoefix_tasks.model.adapter import AdapterIntegrityError, verify_adapter
    from shoefix_tasks.model.base import BaseModelMismatch, base_identity, check_compatible

    try:
        manifest = verify_adapter(adapter_dir)
        check_compatible(manifest["base"], base_identity(recipe.model.base_model, settings), "the challenger")
    except (AdapterIntegrityError, BaseModelMismatch) as err:
        raise CandidateRejected(f"candidate rejected: {err}") from err
    return manifest


def summarize(scores: list[dict[str, Any]], latency: dict[str, Any], gens: list[dict[str, Any]]) -> dict[str, Any]:
    holdout = [s for s in scores if not s["guard"]]
    out = {m: round(statistics.fmean(s[m] for s in holdout), 3) for m in (*QUALITY_METRICS, "composite", "relevance")}
    out["answer_length_words"] = round(statistics.fmean(s["answer_length"] for s in holdout), 1)
    out["new_tokens_mean"] = round(statistics.fmean(g["new_tokens"] for g in gens), 1)
    out["forbidden_claims"] = sum(len(s["forbidden"]) for s in scores)
    stated = [len(s["must_state_stated"]) for s in scores if s["must_state_stated"] or s["must_state_missed"]]
    wanted = [len(s["must_state_stated"]) + len(s["must_state_missed"]) for s in scores
              if s["must_state_stated"] or s["must_state_missed"]]
    out["must_state_coverage"] = round(sum(stated) / sum(wanted), 3) if wanted else 0.0
    out.update({f"latency_{k}": v for k, v in latency.items() if k != "times_s"})
    return out


def score_side(gens: list[dict[str, Any]], items: list[dict[str, Any]], guard_ids: set[str],
               ctx, claims: dict) -> list[dict[str, Any]]:
    """Per question: the scorecard, the safety claims (required ones stated or missed, forbidden ones
    stated: every forbidden claim is checked on every answer), the answer itself."""
    from shoefix_tasks.evaluation.claims import check_item
    from shoefix_tasks.evaluation.metrics import fixed_answers, score_answer

    fixed = fixed_answers(items, [g["answer"] for g in gens])
    out = []
    for i, (it, g) in enumerate(zip(items, gens, strict=True)):
        s = score_answer(it, g["answer"], ctx, guard=it["id"] in guard_ids, fixed=i in fixed).to_dict()
        s["fixed_answer"] = i in fixed
        checked = check_item(it, g["answer"], claims)
        s["must_state_stated"] = [h.claim for h in checked["stated"]]
        s["must_state_missed"] = [h.claim for h in checked["missed"]]
        s["forbidden"] = [{"claim": h.claim, "sentence": h.clause[:300]} for h in checked["forbidden"]]
        s["answer"], s["new_tokens"] = g["answer"], g["new_tokens"]
        out.append(s)
    return out


def run_judge(judge, items: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """Add the LLM judge's scores to both sides; on failure record `judge_error` (gate fails closed)."""
    from shoefix_tasks.evaluation.judge import JudgeError, judge_side

    try:
        for who in ("champion", "challenger"):
            answers = [s["answer"] for s in result[who]["scores"]]
            judged = judge_side(judge, items, answers)
            result[who]["judge"] = judged["per_question"]
            result[who]["summary"].update(judged["summary"])
    except JudgeError as err:
        log.error("LLM judge failed: %s (the gate will fail closed)", err)
        result["judge_error"] = str(err)


def _record_rejection(run_key: str, training_run_id: str, err: Exception) -> None:
    import mlflow

    from shoefix_tasks.store import tracking
    run_id = tracking.run_for("evaluate", run_key, run_name="evaluate",
                              tags={"shoefix.training_run": training_run_id})
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "shoefix.gate_decision", "rejected")
    client.set_tag(run_id, "shoefix.rejected", str(err)[:tracking.TAG_LIMIT])
    client.set_terminated(run_id, status="FAILED")


def latency_verdict(profiles: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """(compare latency?, why). Only a difference in something that can change speed makes a latency
    difference real; with identical profiles any difference is machine noise."""
    champ, chall = profiles["champion"], profiles["challenger"]
    differ = sorted(k for k in {**champ, **chall} if champ.get(k) != chall.get(k))
    if differ:
        return True, f"champion and challenger differ in {', '.join(differ)}: latency compared"
    return False, ("same architecture, dtype, quantization, engine and decoding: no speed difference expected, "
                   "latency reported with its spread and not compared")


def evaluate(settings: Settings, recipe: Recipe, run_key: str, challenger_adapter: Path,
             champion_adapter: Path | None, champion_label: str, training_run_id: str,
             judge=None, require_judge: bool = False, quick: bool = False,
             champion_serving: dict[str, Any] | None = None, policy: Policy | None = None) -> dict[str, Any]:
    """Score both models; log everything to an `evaluate` MLflow run; return a small reference.

    `champion_serving` ({"base_model", "dtype", "served_form"}) is how the champion serves (its registry
    version: a champion registered with the runtime LoRA is scored that way, as it serves);
    default: the recipe's base and dtype (the base model as champion). Raises CandidateRejected
    (recorded on the evaluate run) when the challenger fails its checks or the frozen sets changed.
    """
    import mlflow

    from shoefix_tasks.evaluation.claims import load_claims
    from shoefix_tasks.evaluation.metrics import Context
    from shoefix_tasks.store import tracking

    policy = policy or load_policy()
    tracking.configure(settings)
    try:
        manifest = check_candidate(challenger_adapter, recipe, settings)
        items, guard_ids, eval_hash = eval_items(settings, recipe, quick=quick, policy=policy)
    except (CandidateRejected, EvalSetChanged) as err:
        log.error("%s", err)
        _record_rejection(run_key, training_run_id, err)
        raise CandidateRejected(str(err)) from err
    t0 = time.perf_counter()
    serving = {"base_model": recipe.model.base_model, "dtype": recipe.model.dtype, **(champion_serving or {})}
    ev, margin = recipe.eval, policy.evaluation.token_margin
    # each side opened by the engine it serves with (model/engines.py: llama.cpp for a GGUF base)
    champ = open_engine(serving["base_model"], champion_adapter, settings, dtype=serving["dtype"],
                        repetition_penalty=ev.repetition_penalty, label=champion_label, batch_size=ev.batch_size,
                        served_form=serving.get("served_form") or FORM_MERGED)
    chall = open_engine(recipe.model.base_model, challenger_adapter, settings, dtype=recipe.model.dtype,
                        repetition_penalty=ev.repetition_penalty, label="challenger", batch_size=ev.batch_size)
    refs = [it["answer"] for it in items]
    max_new = max(ev.max_new_tokens, *(math.ceil(margin * max((e.count_tokens(r) for r in refs), default=0))
                                       for e in (champ, chall)))
    questions = [it["question"] for it in items]
    gens = answer_each([champ, chall], questions, max_new)
    holdout_questions = [it["question"] for it in items if it["id"] not in guard_ids]
    n = policy.evaluation.latency_samples  # cycle through the questions if there are fewer
    timed = [holdout_questions[i % len(holdout_questions)] for i in range(n)]
    lat = measure_latency_interleaved([champ, chall], timed, max_new, ev.repetition_penalty,
                                      warmup=policy.evaluation.latency_warmup)
    profiles = {"champion": champ.profile(max_new), "challenger": chall.profile(max_new)}
    champ.close()
    chall.close()
    compared, why = latency_verdict(profiles)
    ctx, claims = Context.from_data(settings.data_dir), load_claims(settings.data_dir)
    sides = {}
    for who, ans in (("champion", champ), ("challenger", chall)):
        scores = score_side(gens[ans.label], items, guard_ids, ctx, claims)
        sides[who] = {"label": ans.label, "scores": scores, "summary": summarize(scores, lat[ans.label], gens[ans.label]),
                      "manifest": ans.manifest, "latency": lat[ans.label], "profile": profiles[who]}
    result = {
        "run_key": run_key, "training_run_id": training_run_id, "holdout_hash": eval_hash,
        "guard_ids": sorted(guard_ids), "champion": sides["champion"], "challenger": sides["challenger"],
        "eval_seconds": round(time.perf_counter() - t0, 2), "scorer": SCORER, "quick": quick,
        "policy": {"source": policy.source, "digest": policy.digest},
        "languages": list(ev.languages), "language_note": language_note(recipe),
        "latency": {"compared": compared, "why": why},
        "challenger_manifest": manifest,
        "decoding": {"do_sample": False, "max_new_tokens": max_new, "repetition_penalty": ev.repetition_penalty,
                     "batch_size": ev.batch_size, "recipe_max_new_tokens": ev.max_new_tokens},
    }
    log.info("%s; %s", result["language_note"], why)
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
                                    "shoefix.holdout_hash": eval_hash, "shoefix.scorer": SCORER,
                                    "shoefix.policy": policy.digest[:16]})
    client = mlflow.MlflowClient()
    tracking.log_metrics(client, run_id, {**{f"{who}/{k}": v for who in ("champion", "challenger")
                                             for k, v in result[who]["summary"].items()},
                                          "eval_seconds": result["eval_seconds"]})
    if result.get("judge_error"):
        client.set_tag(run_id, "shoefix.judge_error", result["judge_error"][:500])
    client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    log.info("evaluation done in %.1fs: champion %s composite %.3f, challenger composite %.3f",
             result["eval_seconds"], champion_label, sides["champion"]["summary"]["composite"],
             sides["challenger"]["summary"]["composite"])
    return {"eval_run_id": run_id, "experiment_id": client.get_run(run_id).info.experiment_id, "evaluation_path": str(path), "holdout_hash": eval_hash,
            "champion": champion_label, "eval_seconds": result["eval_seconds"]}
