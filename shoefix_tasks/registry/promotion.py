"""Promotion: the gate's decision on an evaluation, the registry version it creates, and the move of
alias `champion`, all under the promotion lease (the caller holds it). The version records what was
trained, how it was judged, by which policy, and who triggered the run and why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shoefix_tasks.config import REGISTERED_MODEL, Settings

log = logging.getLogger(__name__)


def evaluation_of(version, settings: Settings) -> dict[str, Any]:
    """The evaluation a version was registered with (its tags), fetched from its MLflow run."""
    import mlflow

    run_id, challenged = version.tags["evaluation_run"], version.tags.get("challenged", "base")
    dst = settings.run_dir(f"evaluation-{run_id}")
    dst.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evaluation.json", dst_path=str(dst))
    return {"eval_run_id": run_id, "evaluation_path": path,
            "champion_version": int(challenged[1:]) if challenged.startswith("v") else None}


def decide_and_register(run_key: str, rec, train_result: dict[str, Any], eval_ref: dict[str, Any], actor: str,
                        settings: Settings, lease, trigger: dict[str, Any] | None = None,
                        promotion: str | None = None) -> dict[str, Any]:
    """Decide with the operator's gate, register the version (tags: provenance, the decision, the
    trigger), and move `champion` only if the gate passed, under the caller's promotion lease.

    `promotion` is the run's own mode (its validated trigger); the policy's mode is read again here,
    and the stricter of the two holds: a policy switched to `review` after the run started still
    applies. Under `review` a passing version is tagged `review: pending` and `champion` stays until
    registry/review.apply_review acts on a person's answer."""
    import mlflow

    from shoefix_tasks.evaluation.gate import Scorecard, decide
    from shoefix_tasks.evaluation.report import scorecard_chart, scorecard_markdown, scorecard_text
    from shoefix_tasks.model.adapter import AdapterIntegrityError, adapter_digest, verify_adapter
    from shoefix_tasks.policy import load_policy, stricter_mode
    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking

    evaluation = json.loads(Path(eval_ref["evaluation_path"]).read_text())
    guard = frozenset(evaluation["guard_ids"])
    # the bytes registered (and maybe promoted) must be the bytes that were evaluated
    digest = adapter_digest(verify_adapter(Path(train_result["adapter_dir"])))
    evaluated = evaluation.get("challenger_manifest")
    if evaluated is None or adapter_digest(evaluated) != digest:
        raise AdapterIntegrityError(f"the adapter in {train_result['adapter_dir']} is not the one evaluated in "
                                    f"{eval_ref['eval_run_id']}: refusing to register it")

    def card(side: str) -> Scorecard:
        scores = evaluation[side]["scores"]
        return Scorecard({s["id"]: s["composite"] for s in scores}, {s["id"]: s["key_data_accuracy"] for s in scores},
                         evaluation[side]["summary"]["latency_p50_s"], guard,
                         forbidden={s["id"]: [f["claim"] for f in s.get("forbidden", [])] for s in scores},
                         must_state={s["id"]: frozenset(s.get("must_state_stated", [])) for s in scores})

    policy = load_policy()
    decision = decide(card("champion"), card("challenger"), policy.gate, judge_error=evaluation.get("judge_error"),
                      latency_compared=evaluation.get("latency", {}).get("compared", True))
    verdict = "promote" if decision.promote else "keep_champion"
    held = decision.promote and stricter_mode(policy.promotion.mode, promotion) == "review"
    markdown = scorecard_markdown(evaluation, decision.to_dict())
    chart = scorecard_chart(evaluation, settings.run_dir(run_key) / "scorecard.png")
    client = mlflow.MlflowClient()
    client.log_artifact(eval_ref["eval_run_id"], str(chart))
    client.log_artifact(train_result["run_id"], str(chart))
    client.log_dict(eval_ref["eval_run_id"], decision.to_dict(), "gate_decision.json")
    client.set_tag(eval_ref["eval_run_id"], "shoefix.gate_decision", verdict)
    tracking.log_metrics(client, eval_ref["eval_run_id"],
                         {f"gate/{k}": v for k, v in decision.numbers.items() if isinstance(v, (int, float))})

    champion_label = evaluation["champion"]["label"]
    # The chart is the evaluation run's artifact; the tracking server serves it at this relative
    # URL, so the MLflow UI shows it inline in the version's description.
    description = (f"## Scorecard vs {champion_label}\n\n{markdown}\n\n"
                   f"![scorecard](get-artifact?path=scorecard.png&run_uuid={eval_ref['eval_run_id']})\n\n"
                   f"(chart: artifact `scorecard.png` of evaluation run `{eval_ref['eval_run_id']}`)")
    tags = {"training_run": train_result["run_id"], "evaluation_run": eval_ref["eval_run_id"],
            "corpus_snapshot": train_result["snapshot_hash"], "holdout_hash": evaluation["holdout_hash"],
            "base_model": rec.model.base_model, "recipe": rec.name, "recipe_sha256": rec.digest, "gate_decision": verdict,
            "challenged": champion_label, "pipeline_run": run_key,
            "composite": str(evaluation["challenger"]["summary"]["composite"]),
            "gate_reasons": tracking.fitted_json(decision.reasons), "adapter_digest": digest,
            "scorer": evaluation.get("scorer", ""), "policy": policy.digest,
            "forbidden_claims": tracking.fitted_json(decision.numbers.get("forbidden_claims", {}))}
    # how it serves = how it was evaluated (base, dtype, decoding with the evaluated answer length)
    serving = {"base_model": rec.model.base_model, "dtype": rec.model.dtype,
               "engine": evaluation["challenger"].get("profile", {}).get("engine", "transformers"),
               "max_new_tokens": evaluation["decoding"]["max_new_tokens"],
               "repetition_penalty": evaluation["decoding"]["repetition_penalty"]}
    tags["serving"] = json.dumps(serving)
    if held:
        tags["review"] = "pending"
    trigger = trigger or {}
    if trigger.get("reason"):
        tags["trigger_reason"] = trigger["reason"][:tracking.TAG_LIMIT]
    if trigger.get("triggered_by"):
        tags["triggered_by"] = trigger["triggered_by"]
    version = registry.register_version(train_result["run_id"], Path(train_result["adapter_dir"]),
                                        rec.model.base_model, tags, description,
                                        {k: serving[k] for k in ("max_new_tokens", "repetition_penalty", "dtype")},
                                        settings=settings)
    registry.set_challenger(int(version.version))
    if decision.promote and not held:
        why = "; ".join(decision.reasons)
        if trigger.get("reason"):
            why = f"triggered because: {trigger['reason']} | gate: {why}"
        who = f"{actor} (run {run_key}" + (f", triggered by {trigger['triggered_by']})" if trigger.get("triggered_by") else ")")
        registry.set_champion(settings, int(version.version), why, who, lease=lease)
    champ = registry.version_by_alias(registry.CHAMPION)
    log.info("gate decision for version %s: %s\n%s", version.version, verdict.upper(), "\n".join(decision.reasons))
    log.info("scorecard (%s vs challenger v%s):\n%s", champion_label, version.version, scorecard_text(evaluation))
    return {"version": int(version.version), "decision": verdict, "reasons": decision.reasons,
            "numbers": decision.numbers, "champion": int(champ.version) if champ else None,
            "challenged": champion_label, "model": REGISTERED_MODEL, "review": "pending" if held else None,
            "evaluation_path": eval_ref["evaluation_path"],
            "trigger_reason": trigger.get("reason"), "triggered_by": trigger.get("triggered_by")}
