"""Roll the ShoeFix champion back to an earlier registry version.

- Trigger: manual only (UI form, `airflow dags trigger`, REST API), with a required `reason`.
- Inputs: params `version` (the registry version of `shoefix-expert` to serve again) and `reason`.
- Outputs: the rollback record (new champion, previous champion, reason).
- Side effects: moves alias `champion` after checking the target's adapter against its manifest,
  reads the alias back, and appends the change to the champion history. Notifies the change (and a
  failure) through the `shoefix_slack` / `shoefix_smtp` connections when they exist.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from shoefix_notify import ShoeFixNotifier


@task(retries=2, retry_delay=timedelta(seconds=30), retry_exponential_backoff=True,
      execution_timeout=timedelta(minutes=15), on_failure_callback=ShoeFixNotifier("failure"),
      on_success_callback=ShoeFixNotifier("champion"))
def rollback_champion() -> dict:
    from shoefix_tasks import registry, tracking
    from shoefix_tasks.config import Settings

    ctx = get_current_context()
    p = ctx["params"]
    settings = Settings.from_env()
    tracking.configure(settings)
    return registry.rollback(settings, int(p["version"]), p["reason"], actor=f"{ctx['dag'].dag_id}:{ctx['run_id']}")


@dag(
    dag_id="shoefix_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Taipei"),
    catchup=False,
    max_active_runs=1,
    tags=["shoefix", "registry", "manual"],
    doc_md=__doc__,
    params={
        "version": Param(type="integer", minimum=1, description="registry version to make champion again"),
        "reason": Param(type="string", minLength=5, description="why (kept in the champion history)"),
    },
)
def shoefix_rollback():
    rollback_champion()


shoefix_rollback()
