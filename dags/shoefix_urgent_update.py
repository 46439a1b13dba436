"""Urgent corpus update: push a correction through the full retraining loop now.

- Trigger: manual only (UI form, `airflow dags trigger -c`, or the REST API), with typed params.
- Inputs: `reason` (required), `inbox` (path or URI; empty = the configured inbox), `files`
  (inbox-relative names; empty = everything new), `recipe`, `evaluation` (`full` holdout or a
  `quick` gate on the first 20 questions), `overrides`.
- Outputs and side effects: as `shoefix_weekly_retrain` (same task graph): a ledgered batch, a
  training run, an evaluation, a registry version; `champion` moves only if the gate passes;
  the same asset events and failure / promotion notifications.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag
from retrain_graph import DEFAULT_ARGS, build_retrain_graph


@dag(
    dag_id="shoefix_urgent_update",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Taipei"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["shoefix", "retrain", "urgent", "manual"],
    doc_md=__doc__,
    params={
        "reason": Param(type="string", minLength=5, description="why this cannot wait for the weekly run"),
        "inbox": Param("", type="string", description="inbox path or URI (empty: the configured inbox)"),
        "files": Param([], type="array", items={"type": "string"}, description="inbox-relative files (empty: all new)"),
        "recipe": Param("default", type="string", description="recipe name or YAML path"),
        "evaluation": Param("full", type="string", enum=["full", "quick"], description="full holdout or quick gate"),
        "overrides": Param([], type="array", items={"type": "string"}, description="recipe overrides"),
        "max_quarantine_rate": Param(0.5, type="number", minimum=0, maximum=1),
    },
)
def shoefix_urgent_update():
    build_retrain_graph()


shoefix_urgent_update()
