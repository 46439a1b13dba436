"""Roll the ShoeFix champion back to an earlier registry version.

- Trigger: manual only (UI form, `airflow dags trigger`, REST API), with a required `reason`.
- Inputs: params `version` (the registry version of `shoefix-expert` to serve again), `reason`
  (5+ non-blank characters) and `force` (default false): a version the gate did not promote
  (tag `gate_decision` other than `promote`) is refused unless `force` is true, and a forced
  rollback is recorded as `rollback-forced` with its reason. Any other conf key is refused.
- Outputs: the rollback record (new champion, previous champion, reason, forced).
- Side effects: moves alias `champion` after checking the target's adapter against its manifest,
  reads the alias back, and appends the change to the champion history. Notifies the change (and a
  failure) through the `shoefix_slack` / `shoefix_smtp` connections when they exist.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task
from shoefix_notify import ShoeFixNotifier
from trigger_conf import no_retry_on_permanent_errors, trigger_params, validated_conf

from shoefix_tasks.config import TIMEZONE


@task(retries=2, retry_delay=timedelta(seconds=30), retry_exponential_backoff=True,
      execution_timeout=timedelta(minutes=15), on_failure_callback=ShoeFixNotifier("failure"),
      on_success_callback=ShoeFixNotifier("champion"))
def rollback_champion() -> dict:
    from shoefix_tasks.config import Settings
    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking

    ctx = get_current_context()
    settings = Settings.from_env()
    tracking.configure(settings)
    user = getattr(ctx["dag_run"], "triggering_user_name", None) or "unnamed user"
    with no_retry_on_permanent_errors():  # a refused trigger or rollback is refused again on retry
        t = validated_conf()
        return registry.rollback(settings, t["version"], t["reason"], force=t["force"],
                                 actor=f"{ctx['dag'].dag_id} (run {ctx['run_id']}, triggered by {user})")


@dag(
    dag_id="shoefix_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz=TIMEZONE),
    catchup=False,
    max_active_runs=1,
    tags=["shoefix", "registry", "manual"],
    doc_md=__doc__,
    params=trigger_params("shoefix_rollback"),  # what a trigger may ask for: shoefix_tasks.ops.trigger
)
def shoefix_rollback():
    rollback_champion()


shoefix_rollback()
