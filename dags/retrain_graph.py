"""The retraining task graph, shared by the weekly and urgent DAGs (no copy-paste between them).

collect_qa >> validate_qa >> train_adapter >> evaluate_adapter >> gate_and_promote
    >> needs_review >> review_promotion >> apply_review   (review_graph.py: a person's approval, when
                                                           the policy or the run asks for one)

`collect_qa` first checks the run's params against shoefix_tasks.ops.trigger (trigger_conf.py) and
keeps the validated values in XCom `trigger`; every later task uses those, never the raw params.
Each task calls one `shoefix_tasks.pipeline` function and returns a small dict. `collect_qa` and
`validate_qa` short-circuit the rest when nothing new was accepted, so an idle week neither trains
nor creates a registry version.

Assets (data-aware scheduling): `collect_qa` emits `shoefix://inbox/collected` and `validate_qa`
emits `shoefix://corpus/accepted`, each with the batch id and counts as the event's extra, and
only when there was something new (through an AssetAlias: a plain outlet would fire on every
successful run, idle ones included). `shoefix://inbox/new` is announced by `shoefix_inbox_watch`;
with SHOEFIX_ASSET_TRIGGER=on the weekly DAG also runs when it fires.
Notifications: every task notifies on failure, `gate_and_promote` on a promotion (shoefix_notify).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

from airflow.sdk import (
    Asset,
    AssetAlias,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    DeadlineAlert,
    DeadlineReference,
    SyncCallback,
    get_current_context,
    task,
)
from review_graph import review_promotion
from shoefix_notify import ShoeFixNotifier
from trigger_conf import TRIGGER_XCOM, no_retry_on_permanent_errors, validated_conf

from shoefix_tasks import config

DEFAULT_ARGS = {
    "owner": "shoefix",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": ShoeFixNotifier("failure"),  # after the last retry; silent without a connection
}

INBOX_NEW = Asset("shoefix://inbox/new")  # unprocessed files in the inbox (shoefix_inbox_watch, or a REST POST)
COLLECTED = Asset("shoefix://inbox/collected")  # a batch was ledgered
ACCEPTED = Asset("shoefix://corpus/accepted")  # validated Q&A joined the corpus
COLLECTED_ALIAS, ACCEPTED_ALIAS = AssetAlias("shoefix_collected"), AssetAlias("shoefix_accepted")
WEEKLY_CRON = "0 3 * * 1"
TIMEZONE = config.TIMEZONE


def asset_trigger_enabled() -> bool:
    """SHOEFIX_ASSET_TRIGGER=on: retrain when new Q&A lands, not only weekly (off by default)."""
    return os.environ.get("SHOEFIX_ASSET_TRIGGER", "off").strip().lower() in ("1", "on", "true", "yes")


def weekly_schedule():
    """The weekly cron, or (setting on) the cron OR an event on `shoefix://inbox/new`."""
    if not asset_trigger_enabled():
        return WEEKLY_CRON
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(WEEKLY_CRON, timezone=TIMEZONE), assets=INBOX_NEW)


def parsed_by_dags_test() -> bool:
    """Is this process `airflow dags test` (the embedded default's runner)?"""
    return sys.argv[1:3] == ["dags", "test"]


def late_run_alert() -> DeadlineAlert | None:
    """The weekly DAG's deadline: a run still going `alerts.late_after_hours` (policy) after it was
    queued notifies through shoefix_notify (Slack / SMTP). Measured from when the run was queued, a
    fixed interval: Airflow's AVERAGE_RUNTIME reference would learn "usual" from idle weeks that
    short-circuit in seconds and then call every week with new data late.

    None under `airflow dags test`: it runs no scheduler, so no deadline is ever checked there, and
    Airflow 3.3.2's DAG.test() fails a run that *succeeds* with a deadline alert (DagRun.update_state
    looks the in-process serialized alerts up as deadline_alert ids: "'dict' object has no attribute
    'hex'"), which would fail `make demo` and every `dags test` of this DAG."""
    if parsed_by_dags_test():
        return None
    from shoefix_notify import notify_late_run

    from shoefix_tasks.policy import load_policy

    hours = load_policy().alerts.late_after_hours
    return DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(hours=hours),
                         callback=SyncCallback(notify_late_run, kwargs={"late_after_hours": hours}),
                         name="shoefix_late_run")


def _emit(alias: AssetAlias, asset: Asset, extra: dict) -> None:
    get_current_context()["outlet_events"][alias].add(asset, extra=extra)


def _run_key() -> str:
    return get_current_context()["run_id"]


def _trigger() -> dict:
    """The values collect_qa validated (never the raw params): the resolved recipe file and its hash,
    quick, reason, who triggered ..."""
    return get_current_context()["ti"].xcom_pull(task_ids="collect_qa", key=TRIGGER_XCOM)


def _recipe(t: dict) -> str:
    """The run's resolved recipe file (load_resolved raises a PermanentError if it changed since
    collect_qa resolved it)."""
    from shoefix_tasks.pipeline import load_resolved

    load_resolved(t["recipe_file"], t["recipe_sha256"])
    return t["recipe_file"]


@task.short_circuit(execution_timeout=timedelta(minutes=30), outlets=[COLLECTED_ALIAS])
def collect_qa() -> dict:
    from shoefix_tasks.pipeline import collect_qa as run
    from shoefix_tasks.pipeline import resolve_recipe

    ctx = get_current_context()
    with no_retry_on_permanent_errors():
        trig = validated_conf()
        trig.update(resolve_recipe(_run_key(), trig["recipe"], trig["overrides"]),  # once per run, hashed
                    dag_id=ctx["dag"].dag_id, triggered_by=getattr(ctx.get("dag_run"), "triggering_user_name", None))
        ctx["ti"].xcom_push(key=TRIGGER_XCOM, value=trig)
        ref = run(_run_key(), inbox=trig["inbox"], files=trig["files"] or None)
    if ref["collected"]:
        _emit(COLLECTED_ALIAS, COLLECTED, ref)
    return ref if ref["collected"] else {}  # empty -> downstream skipped: nothing new


@task.short_circuit(execution_timeout=timedelta(minutes=30), outlets=[ACCEPTED_ALIAS])
def validate_qa(batch: dict) -> dict:
    from shoefix_tasks.pipeline import validate_qa as run

    with no_retry_on_permanent_errors():  # e.g. a batch mostly quarantined: a retry fails the same way
        result = run(batch["batch_id"])  # the policy's trigger.max_quarantine_rate
    if result["accepted"]:
        _emit(ACCEPTED_ALIAS, ACCEPTED, {k: result.get(k) for k in (
            "batch_id", "seen", "accepted", "quarantined", "deferred", "snapshot_hash", "snapshot_records")})
    return result if result["accepted"] else {}


@task(task_id="train_adapter")
def _train_adapter_task(validated: dict) -> dict:
    from shoefix_tasks.pipeline import train_adapter as run

    with no_retry_on_permanent_errors():  # wrong node, out of memory at micro-batch 1, ...
        return run(_run_key(), _recipe(_trigger()), validated["snapshot_path"])


def _trainer_pod(cfg):
    """train_adapter as a pod of the trainer image on a GPU node (SHOEFIX_TRAIN_DISPATCH=kubernetes)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowFailException

    from shoefix_tasks.errors import NO_RETRY_EXIT_CODES
    from shoefix_tasks.training.dispatch import kubernetes_pod_kwargs, pod_exit_code, trainer_args

    class TrainerPod(KubernetesPodOperator):
        def cleanup(self, pod, remote_pod, xcom_result=None, context=None):
            try:
                return super().cleanup(pod, remote_pod, xcom_result, context)
            except Exception as err:
                code = pod_exit_code(remote_pod, self.base_container_name)
                if code in NO_RETRY_EXIT_CODES:
                    raise AirflowFailException(f"trainer pod exited with code {code}: wrong node for the recipe, "
                                               "or out of memory at micro-batch 1 (see its log)") from err
                raise

    trig = f"ti.xcom_pull(task_ids='collect_qa', key='{TRIGGER_XCOM}')"  # the validated values, never params
    args = trainer_args(f"{{{{ {trig}['recipe_file'] }}}}", "{{ ti.xcom_pull(task_ids='validate_qa')['snapshot_path'] }}",
                        None, "{{ run_id }}", [])
    return TrainerPod(task_id="train_adapter", execution_timeout=timedelta(seconds=cfg.timeout_s),
                      **cfg.task_routing(), **kubernetes_pod_kwargs(cfg, args))


def train_adapter(validated):
    """The training step, placed where SHOEFIX_TRAIN_DISPATCH says (shoefix_tasks.training.dispatch):
    a task on this worker (`local`), on Celery queue `gpu` (`celery`), or a pod (`kubernetes`);
    always in pool `gpu`."""
    from shoefix_tasks.training.dispatch import DispatchConfig

    cfg = DispatchConfig.from_env()
    if cfg.mode == "kubernetes":
        pod = _trainer_pod(cfg)
        validated >> pod
        return pod.output
    return _train_adapter_task.override(execution_timeout=timedelta(seconds=cfg.timeout_s),
                                        **cfg.task_routing())(validated)


JUDGE_CONN_ID = "shoefix_judge"


def _judge_config():
    """The optional LLM judge from connection `shoefix_judge` (absent = deterministic scores only)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(JUDGE_CONN_ID)
    except AirflowNotFoundException:
        return None
    from shoefix_tasks.evaluation.judge import JudgeConfig

    extra = conn.extra_dejson
    url = conn.host if "://" in (conn.host or "") else f"{conn.schema or 'http'}://{conn.host}:{conn.port or 80}/v1"
    return JudgeConfig(base_url=url, model=extra.get("model", "judge"), api_key=conn.password or "",
                       repeats=int(extra.get("repeats", 3)))


@task(execution_timeout=timedelta(hours=2))
def evaluate_adapter(trained: dict) -> dict:
    from shoefix_tasks.pipeline import evaluate_adapter as run

    t = _trigger()
    with no_retry_on_permanent_errors():  # a tampered candidate, a changed holdout, ...
        return run(_run_key(), _recipe(t), trained, judge=_judge_config(), quick=t["quick"])


# generous: under the promotion lock it may wait for another run's gate, then evaluate again
@task(execution_timeout=timedelta(hours=3), retries=3, on_success_callback=ShoeFixNotifier("champion"))
def gate_and_promote(trained: dict, evaluated: dict) -> dict:
    from shoefix_tasks.pipeline import gate_and_promote as run

    t = _trigger()
    ctx = get_current_context()
    # the judge: needed if the champion moved and the candidate must be evaluated again
    return run(_run_key(), _recipe(t), trained, evaluated, actor=ctx["dag"].dag_id, judge=_judge_config(),
               quick=t["quick"], trigger={k: t.get(k) for k in ("reason", "triggered_by", "dag_id")},
               promotion=t.get("promotion"))  # None (a run from before): the policy's mode


@task(execution_timeout=timedelta(minutes=30), on_success_callback=ShoeFixNotifier("use"))
def summarize_use() -> dict:
    """The weekly summary of use: served answers sent to MLflow, corrections waiting, questions the corpus
    does not cover (pipeline.summarize_use). Its notification goes out with every weekly run."""
    from shoefix_tasks import pipeline

    return pipeline.summarize_use()


def build_retrain_graph() -> None:
    trained = train_adapter(validate_qa(collect_qa()))
    review_promotion(gate_and_promote(trained, evaluate_adapter(trained)))
