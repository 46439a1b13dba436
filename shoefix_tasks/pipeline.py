"""The five stages of the retraining pipeline as plain functions, one per Airflow task, plus the
two of a promotion held for a person's review (`review_request`, `apply_review`).

Each takes references (a run key, a recipe name, paths, run ids) and returns a small JSON-able
dict; none imports Airflow. Heavy libraries are imported inside the stages that need them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Settings, load_recipe

log = logging.getLogger(__name__)


def resolve_recipe(run_key: str, recipe: str, overrides: list[str] | None = None,
                   settings: Settings | None = None) -> dict[str, str]:
    """Resolve the run's recipe once (name + overrides -> one YAML file in the run's folder) and
    return {"recipe_file", "recipe_sha256"}: every later task trains, evaluates and gates with this
    file, so an edit of `recipes/<name>.yaml` during a run cannot make training and the gate see
    different recipes. A retry finds the file and keeps it."""
    import yaml

    settings = settings or Settings.from_env()
    path = settings.run_dir(run_key) / "recipe.yaml"
    if not path.is_file():
        rec = load_recipe(recipe, overrides)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"name": rec.name, **rec.to_dict()}, sort_keys=True))
        tmp.replace(path)
    rec = load_recipe(str(path))
    log.info("recipe %s resolved for run %s (sha256 %s): %s", rec.name, run_key, rec.digest[:12], path)
    return {"recipe_file": str(path), "recipe_sha256": rec.digest}


def load_resolved(recipe_file: str, sha256: str):
    """The run's resolved recipe, refused if its content changed since it was resolved."""
    from shoefix_tasks.errors import PermanentError

    rec = load_recipe(recipe_file)
    if rec.digest != sha256:
        raise PermanentError(f"{recipe_file} changed after it was resolved for this run "
                             f"({sha256[:12]} -> {rec.digest[:12]})")
    return rec


def collect_qa(run_key: str, settings: Settings | None = None, inbox: str | None = None,
               files: list[str] | None = None, sql_source: str | None = None) -> dict[str, Any]:
    """`inbox` overrides the configured inbox (path or URI); `files` restricts to named files."""
    import dataclasses

    from shoefix_tasks.intake.collect import collect_batch

    settings = settings or Settings.from_env()
    if inbox:
        settings = dataclasses.replace(settings, inbox=inbox)
    # collect_batch logs the run's own one-line account (nothing new, deferred files, quarantine)
    return collect_batch(settings, run_key, sql_source=sql_source, only=files or None).to_dict()


def validate_qa(run_key: str, max_quarantine_rate: float | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """`max_quarantine_rate` None = the policy's `trigger.max_quarantine_rate` (what the DAGs use: a
    trigger cannot loosen it; tests and tools calling Python directly may pass their own)."""
    from shoefix_tasks.intake.validate import validate_batch
    from shoefix_tasks.policy import load_policy

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
    from shoefix_tasks.errors import EXIT_STOPPED, NO_RETRY_EXIT_CODES
    from shoefix_tasks.training import dispatch

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
    from shoefix_tasks.evaluation.evaluate import evaluate
    from shoefix_tasks.registry import served
    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking

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
    serving["served_form"] = served.served_form(champ.tags) if champ is not None else None
    ref = evaluate(settings, rec, run_key, Path(train_result["adapter_dir"]), champ_adapter, label,
                   train_result["run_id"], judge=judge, require_judge=require_judge, quick=quick,
                   champion_serving={k: serving[k] for k in ("base_model", "dtype", "served_form")
                                     if serving.get(k)} or None)
    ref["champion_version"] = int(champ.version) if champ is not None else None
    ref["judged"] = judge is not None
    return ref


def gate_and_promote(run_key: str, recipe: str, train_result: dict[str, Any], eval_ref: dict[str, Any],
                     overrides: list[str] | None = None, actor: str = "shoefix_weekly_retrain",
                     settings: Settings | None = None, judge=None, quick: bool = False,
                     trigger: dict[str, Any] | None = None, promotion: str | None = None) -> dict[str, Any]:
    """Decide, register and (maybe) promote, all under the promotion lease.

    Inside the lease the champion is read again. If it changed since `eval_ref` was scored (another
    run promoted, or an operator rolled back), the candidate is evaluated again against the champion
    of *now* before deciding: scores are only comparable when both models answer in one process with
    the same decoding, so reusing the other run's numbers would mix machines and loads. This costs
    one evaluation, and only when two runs actually collide. `judge` is the evaluation's LLM judge,
    needed for such a re-evaluation (without it, one that was judged fails closed). `trigger` is who
    asked for this run and why ({"reason", "triggered_by", "dag_id"}): recorded with the version and
    in the champion history. `promotion` is the run's mode (`review`: a passing version waits for a
    person, see `review_request` / `apply_review`; the policy's mode is applied too, the stricter wins).
    """
    from shoefix_tasks.registry import promotion
    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking

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
            eval_ref = promotion.evaluation_of(mine, settings)
        reevaluated = None
        if now != eval_ref.get("champion_version") and (mine is None or now != int(mine.version)):
            log.warning("champion changed from %s to %s since this candidate was evaluated: evaluating again",
                        eval_ref.get("champion_version"), now)
            eval_ref = evaluate_adapter(f"{run_key}.vs-{f'v{now}' if now else 'base'}", recipe, train_result, overrides, settings,
                                        judge=judge, require_judge=judged, quick=quick)
            reevaluated = now
        out = promotion.decide_and_register(run_key, rec, train_result, eval_ref, actor, settings, lease, trigger,
                                            promotion=promotion)
    return {**out, "reevaluated_against": reevaluated, "lock_waited_s": round(lease.waited_s, 2)}


def review_request(gated: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """Subject and Markdown body of the approval task for a version held for review (`gated` is
    gate_and_promote's result): the scorecard, intervals, guard results and the answers that changed most."""
    from shoefix_tasks.records import load_eval_set
    from shoefix_tasks.registry.review import review_body

    settings = settings or Settings.from_env()
    evaluation = json.loads(Path(gated["evaluation_path"]).read_text())
    langs = evaluation.get("languages") or None
    questions = {it["id"]: it["question"] for kind in ("holdout", "guard")
                 for it in load_eval_set(settings.data_dir, kind, langs)}
    decision = {"promote": True, "reasons": gated["reasons"], "numbers": gated.get("numbers", {})}
    return {"subject": f"Promote {gated.get('model', 'shoefix-expert')} v{gated['version']} to champion "
                       f"(challenged {gated.get('challenged', 'base')})?",
            "body": review_body(evaluation, decision, int(gated["version"]), questions)}


def apply_review(run_key: str, gated: dict[str, Any], response: dict[str, Any] | None, actor: str,
                 settings: Settings | None = None) -> dict[str, Any]:
    """Act on a person's answer to the approval task (None: no answer, it timed out): approve moves
    `champion`, anything else keeps it; every outcome is recorded (registry/review.py)."""
    from shoefix_tasks.registry import review
    from shoefix_tasks.store import tracking

    settings = settings or Settings.from_env()
    tracking.configure(settings)
    return review.apply_review(settings, gated, response, actor, run_key)


def summarize_use(settings: Settings | None = None, top: int = 10) -> dict[str, Any]:
    """What users asked and experts corrected since the answer log began: sends waiting traces to MLflow
    first (the serving process does too; this catches what it could not), then the most-asked questions
    the corpus does not cover, by topic, and the corrections in the inbox (collected or not)."""
    from shoefix_tasks.intake.asked import by_topic
    from shoefix_tasks.registry import answer_log, feedback

    settings = settings or Settings.from_env()
    sent = answer_log.flush(settings)
    attached = feedback.attach_pending(settings)
    answers, rows = answer_log.uncovered_questions(settings, top)
    corrections = feedback.list_feedback(settings)
    return {"answers": answers, "traces_sent": sent["sent"], "traces_waiting": sent["pending"],
            "traces_dropped": sent["dropped"], "feedback_attached": attached, "corrections": len(corrections),
            "uncovered": {t: [{"question": r["question"][:200], "asked": r["asked"]} for r in rs]
                          for t, rs in by_topic(rows).items()}}
