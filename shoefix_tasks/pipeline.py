"""The five stages of the retraining pipeline as plain functions, one per Airflow task.

Each takes references (a run key, a recipe name, paths, run ids) and returns a small JSON-able
dict; none imports Airflow. Heavy libraries are imported inside the stages that need them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shoefix_tasks.config import REGISTERED_MODEL, Settings, load_recipe

log = logging.getLogger(__name__)


def collect_qa(run_key: str, settings: Settings | None = None, inbox: str | None = None,
               files: list[str] | None = None, sql_source: str | None = None) -> dict[str, Any]:
    """`inbox` overrides the configured inbox (path or URI); `files` restricts to named files."""
    import dataclasses

    from shoefix_tasks.collect import collect_batch

    settings = settings or Settings.from_env()
    if inbox:
        settings = dataclasses.replace(settings, inbox=inbox)
    ref = collect_batch(settings, run_key, sql_source=sql_source, only=files or None).to_dict()
    if ref["seen"] == 0:
        log.info("nothing new in the inbox %s: no new Q&A since the last run", settings.inbox)
    return ref


def validate_qa(run_key: str, max_quarantine_rate: float | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """`max_quarantine_rate` None = the policy's `trigger.max_quarantine_rate` (what the DAGs use: a
    trigger cannot loosen it; tests and tools calling Python directly may pass their own)."""
    from shoefix_tasks.policy import load_policy
    from shoefix_tasks.validate import validate_batch

    settings = settings or Settings.from_env()
    if max_quarantine_rate is None:
        max_quarantine_rate = load_policy().trigger.max_quarantine_rate
    return validate_batch(settings, run_key, max_quarantine_rate).to_dict()


def train_adapter(run_key: str, recipe: str, snapshot_path: str, overrides: list[str] | None = None,
                  settings: Settings | None = None) -> dict[str, Any]:
    """Run the trainer CLI as a subprocess: the same entry point a GPU worker or pod runs.

    `accelerate launch` of it when `SHOEFIX_TRAIN_PROCESSES` asks for more than one process.
    Raises `TrainerUnfit` (fail, no retry) for a failed GPU preflight or out of memory at
    micro-batch 1, `TrainerStopped` when it stopped on a signal after a checkpoint.
    """
    from shoefix_tasks import dispatch
    from shoefix_tasks.train import EXIT_STOPPED, NO_RETRY_EXIT_CODES

    settings = settings or Settings.from_env()
    load_recipe(recipe, overrides)  # fail fast on a bad recipe, before a process is spawned
    out_dir = settings.run_dir(run_key) / "train"
    processes = dispatch.resolve_processes(dispatch.DispatchConfig.from_env().processes)
    cmd = dispatch.launch_prefix(processes) + dispatch.trainer_args(recipe, snapshot_path, str(out_dir), run_key,
                                                                    overrides or [])
    code, result = dispatch.run_trainer(cmd)
    if code in NO_RETRY_EXIT_CODES:
        raise dispatch.TrainerUnfit(f"trainer exited with code {code}: this node cannot run recipe {recipe!r} "
                           "(see the trainer log above)")
    if code == EXIT_STOPPED:
        raise dispatch.TrainerStopped(f"trainer stopped on a signal after writing a checkpoint in {out_dir}; "
                             "a retry resumes from it")
    if code != 0:
        raise RuntimeError(f"trainer exited with code {code}")
    if result is None:
        raise RuntimeError("trainer printed no result line")
    return result


def evaluate_adapter(run_key: str, recipe: str, train_result: dict[str, Any], overrides: list[str] | None = None,
                     settings: Settings | None = None, judge=None, require_judge: bool = False,
                     quick: bool = False) -> dict[str, Any]:
    """`judge` is an optional `JudgeConfig` (never logged or returned: it may hold an API key);
    `require_judge` makes a missing judge a recorded judge failure (the gate then fails closed);
    `quick` evaluates the policy's stratified sample of the holdout (the guard set always in full)."""
    from shoefix_tasks import registry, tracking
    from shoefix_tasks.evaluate import evaluate

    settings = settings or Settings.from_env()
    rec = load_recipe(recipe, overrides)
    tracking.configure(settings)
    champ = registry.version_by_alias(registry.CHAMPION)
    if champ is not None and champ.run_id == train_result["run_id"]:
        # the whole run was cleared and re-run after this adapter was promoted: never compare an
        # adapter with itself; score it against the base instead
        champ = None
    champ_adapter = registry.download_adapter(champ, settings) if champ is not None else None
    label = f"v{champ.version}" if champ is not None else "base"
    serving = json.loads(champ.tags.get("serving", "{}")) if champ is not None else {}
    ref = evaluate(settings, rec, run_key, Path(train_result["adapter_dir"]), champ_adapter, label,
                   train_result["run_id"], judge=judge, require_judge=require_judge, quick=quick,
                   champion_serving={k: serving[k] for k in ("base_model", "dtype") if k in serving} or None)
    ref["champion_version"] = int(champ.version) if champ is not None else None
    ref["judged"] = judge is not None
    return ref


def gate_and_promote(run_key: str, recipe: str, train_result: dict[str, Any], eval_ref: dict[str, Any],
                     overrides: list[str] | None = None, actor: str = "shoefix_weekly_retrain",
                     settings: Settings | None = None, judge=None, quick: bool = False) -> dict[str, Any]:
    """Decide, register and (maybe) promote, all under the promotion lease.

    Inside the lease the champion is read again. If it changed since `eval_ref` was scored (another
    run promoted, or an operator rolled back), the candidate is evaluated again against the champion
    of *now* before deciding: scores are only comparable when both models answer in one process with
    the same decoding, so reusing the other run's numbers would mix machines and loads. This costs
    one evaluation, and only when two runs actually collide. `judge` is the evaluation's LLM judge,
    needed for such a re-evaluation (without it, one that was judged fails closed).
    """
    from shoefix_tasks import registry, tracking

    settings = settings or Settings.from_env()
    rec = load_recipe(recipe, overrides)
    tracking.configure(settings)
    with registry.promotion_lock(settings, f"{actor}:{run_key}") as lease:
        champ = registry.version_by_alias(registry.CHAMPION)
        mine = registry.version_for_run(train_result["run_id"])
        now = int(champ.version) if champ is not None else None
        judged = eval_ref.get("judged", False)
        if mine is not None and mine.tags.get("evaluation_run", eval_ref["eval_run_id"]) != eval_ref["eval_run_id"]:
            # an earlier attempt decided on a re-evaluation: a retry decides on the same one
            eval_ref = _evaluation_of(mine, settings)
        reevaluated = None
        if now != eval_ref.get("champion_version") and (mine is None or now != int(mine.version)):
            log.warning("champion changed from %s to %s since this candidate was evaluated: evaluating again",
                        eval_ref.get("champion_version"), now)
            eval_ref = evaluate_adapter(f"{run_key}.vs-{f'v{now}' if now else 'base'}", recipe, train_result, overrides, settings,
                                        judge=judge, require_judge=judged, quick=quick)
            reevaluated = now
        out = _decide_and_register(run_key, rec, train_result, eval_ref, actor, settings, lease)
    return {**out, "reevaluated_against": reevaluated, "lock_waited_s": round(lease.waited_s, 2)}


def _evaluation_of(version, settings: Settings) -> dict[str, Any]:
    """The evaluation a version was registered with (its tags), fetched from its MLflow run."""
    import mlflow

    run_id, challenged = version.tags["evaluation_run"], version.tags.get("challenged", "base")
    dst = settings.run_dir(f"evaluation-{run_id}")
    dst.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evaluation.json", dst_path=str(dst))
    return {"eval_run_id": run_id, "evaluation_path": path,
            "champion_version": int(challenged[1:]) if challenged.startswith("v") else None}


def _decide_and_register(run_key: str, rec, train_result: dict[str, Any], eval_ref: dict[str, Any], actor: str,
                         settings: Settings, lease) -> dict[str, Any]:
    import mlflow

    from shoefix_tasks import registry
    from shoefix_tasks.adapter import AdapterIntegrityError, adapter_digest, verify_adapter
    from shoefix_tasks.gate import Scorecard, decide
    from shoefix_tasks.policy import load_policy
    from shoefix_tasks.report import scorecard_chart, scorecard_markdown, scorecard_text

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
    markdown = scorecard_markdown(evaluation, decision.to_dict())
    chart = scorecard_chart(evaluation, settings.run_dir(run_key) / "scorecard.png")
    client = mlflow.MlflowClient()
    client.log_artifact(eval_ref["eval_run_id"], str(chart))
    client.log_artifact(train_result["run_id"], str(chart))
    client.log_dict(eval_ref["eval_run_id"], decision.to_dict(), "gate_decision.json")
    client.set_tag(eval_ref["eval_run_id"], "shoefix.gate_decision", verdict)
    for k, v in decision.numbers.items():
        if isinstance(v, (int, float)):
            client.log_metric(eval_ref["eval_run_id"], f"gate/{k}", float(v))

    champion_label = evaluation["champion"]["label"]
    # The chart is the evaluation run's artifact; the tracking server serves it at this relative
    # URL, so the MLflow UI shows it inline in the version's description.
    description = (f"## Scorecard vs {champion_label}\n\n{markdown}\n\n"
                   f"![scorecard](get-artifact?path=scorecard.png&run_uuid={eval_ref['eval_run_id']})\n\n"
                   f"(chart: artifact `scorecard.png` of evaluation run `{eval_ref['eval_run_id']}`)")
    tags = {"training_run": train_result["run_id"], "evaluation_run": eval_ref["eval_run_id"],
            "corpus_snapshot": train_result["snapshot_hash"], "holdout_hash": evaluation["holdout_hash"],
            "base_model": rec.model.base_model, "recipe": rec.name, "gate_decision": verdict,
            "challenged": champion_label, "pipeline_run": run_key,
            "composite": str(evaluation["challenger"]["summary"]["composite"]),
            "gate_reasons": json.dumps(decision.reasons)[:4900], "adapter_digest": digest,
            "scorer": evaluation.get("scorer", ""), "policy": policy.digest,
            "forbidden_claims": json.dumps(decision.numbers.get("forbidden_claims", {}))[:4900]}
    # how it serves = how it was evaluated (base, dtype, decoding with the evaluated answer length)
    serving = {"base_model": rec.model.base_model, "dtype": rec.model.dtype, "engine": "transformers",
               "max_new_tokens": evaluation["decoding"]["max_new_tokens"],
               "repetition_penalty": evaluation["decoding"]["repetition_penalty"]}
    tags["serving"] = json.dumps(serving)
    version = registry.register_version(train_result["run_id"], Path(train_result["adapter_dir"]),
                                        rec.model.base_model, tags, description,
                                        {k: serving[k] for k in ("max_new_tokens", "repetition_penalty", "dtype")},
                                        settings=settings)
    registry.set_challenger(int(version.version))
    if decision.promote:
        registry.set_champion(settings, int(version.version), "; ".join(decision.reasons), actor, lease=lease)
    champ = registry.version_by_alias(registry.CHAMPION)
    log.info("gate decision for version %s: %s\n%s", version.version, verdict.upper(), "\n".join(decision.reasons))
    log.info("scorecard (%s vs challenger v%s):\n%s", champion_label, version.version, scorecard_text(evaluation))
    return {"version": int(version.version), "decision": verdict, "reasons": decision.reasons,
            "numbers": decision.numbers, "champion": int(champ.version) if champ else None,
            "challenged": champion_label, "model": REGISTERED_MODEL}
