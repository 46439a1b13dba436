"""Weekly retraining of the ShoeFix expert.

- Trigger: every Monday 03:00 Asia/Taipei (cron), or manually; with SHOEFIX_ASSET_TRIGGER=on also
  when Asset `shoefix://inbox/new` gets an event (new Q&A landed, see `shoefix_inbox_watch`).
- Inputs: new expert Q&A files in the inbox ($SHOEFIX_INBOX); params `recipe` (a name from the
  recipe folders) and `overrides` (`{"train.learning_rate": 1e-4}`: allowlisted `train.*` keys
  within bounds). Gate, evaluation sizes and the quarantine limit are the server's policy
  (SHOEFIX_POLICY), never params; any other conf key is refused.
- Outputs: a ledgered, validated batch; a corpus snapshot; an MLflow training run with the LoRA
  adapter; an evaluation run with the scorecard; a version of `shoefix-expert`.
- Side effects: moves alias `challenger` to the new version, and alias `champion` only if the
  gate passes (history kept in the ledger). Skips everything after collection when nothing new
  arrived. Asset events `shoefix://inbox/collected` and `shoefix://corpus/accepted` (batch id and
  counts) when something new was collected / accepted. Notifies (Slack `shoefix_slack` and/or SMTP
  `shoefix_smtp`) when a task fails for good, when a new champion is promoted, and when a run is
  still going `alerts.late_after_hours` (policy) after it was queued (an Airflow deadline alert).
- Use summary: task `summarize_use` sends the answer log's waiting traces to MLflow and notifies what
  users asked that the corpus does not cover, and how many expert corrections wait in the inbox.
- Promotion: with the policy's `promotion.mode: review` (or param `promotion: review`), a passing
  version waits in task `review_promotion` for a person's Approve / Reject (review_graph.py).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag
from retrain_graph import (
    DEFAULT_ARGS,
    TIMEZONE,
    build_retrain_graph,
    late_run_alert,
    summarize_use,
    weekly_schedule,
)
from trigger_conf import trigger_params


@dag(
    dag_id="shoefix_weekly_retrain",
    schedule=weekly_schedule(),
    start_date=pendulum.datetime(2026, 1, 5, tz=TIMEZONE),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["shoefix", "retrain", "weekly"],
    doc_md=__doc__,
    params=trigger_params("shoefix_weekly_retrain"),  # what a trigger may ask for: shoefix_tasks.ops.trigger
    deadline=late_run_alert(),  # notifies when a run is still going long after it was queued
)
def shoefix_weekly_retrain():
    build_retrain_graph()
    summarize_use()  # beside the chain, not after it: a run with nothing new still reports what users asked


shoefix_weekly_retrain()
