"""Urgent corpus update: push a correction through the full retraining loop now.

- Trigger: manual only (UI form, `airflow dags trigger -c`, or the REST API), with typed params.
- Inputs: `reason` (required, 5+ non-blank characters), `inbox` (path or URI inside the
  configured inbox or a policy `trigger.inbox_roots` entry; empty = the configured inbox), `files`
  (inbox-relative names; empty = everything new), `recipe` (a name, never a path), `evaluation`
  (`full` holdout, or `quick`: the policy's seeded, topic-stratified sample, where the policy
  allows it), `overrides` (`{"train.learning_rate": 1e-4}`: allowlisted `train.*` keys within
  bounds), `promotion` (`policy`, or `review`: hold this run's promotion for a person's approval;
  `auto` is refused when the policy says `review`: a trigger may tighten the policy, never loosen
  it). Anything else is refused: 400 from the REST API, a failed first task otherwise.
- Outputs and side effects: as `shoefix_weekly_retrain` (same task graph): a ledgered batch, a
  training run, an evaluation, a registry version; `champion` moves only if the gate passes;
  the same asset events and failure / promotion notifications.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag
from retrain_graph import DEFAULT_ARGS, build_retrain_graph
from trigger_conf import trigger_params

from shoefix_tasks.config import TIMEZONE


@dag(
    dag_id="shoefix_urgent_update",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz=TIMEZONE),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["shoefix", "retrain", "urgent", "manual"],
    doc_md=__doc__,
    params=trigger_params("shoefix_urgent_update"),  # what a trigger may ask for: shoefix_tasks.ops.trigger
)
def shoefix_urgent_update():
    build_retrain_graph()


shoefix_urgent_update()
