"""A person's hold on a promotion: the three tasks after `gate_and_promote` in both retraining DAGs.

gate_and_promote >> needs_review >> review_promotion >> apply_review

Under the policy's `promotion.mode: review` (or a run triggered with `promotion: review`),
gate_and_promote registers a passing version as `challenger` but leaves `champion` alone and says
`review: pending`. Then:
- `needs_review` short-circuits the rest when nothing is pending (mode `auto`, or the gate kept
  the champion), so an auto run looks as it always did; otherwise it writes the reviewer's page;
- `review_promotion` is Airflow's standard human-in-the-loop operator: Approve or Reject with a
  comment, in the UI's Required Actions or through the REST API
  (`PATCH /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/review_promotion/-1/hitlDetails`). No
  answer within the policy's `promotion.review_timeout_hours` fails it (no defaults: an expired
  review must never read as a decision) and it is never retried (a retry would ask again);
- `apply_review` runs whatever the review task's end (trigger rule all_done_min_one_success:
  needs_review succeeded) and calls shoefix_tasks: approve moves `champion`, reject or time-out
  keep it, and every outcome lands in the champion history with who decided and why.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param, TriggerRule, get_current_context, task
from shoefix_notify import ShoeFixNotifier

REVIEW_TASK = "review_promotion"


@task.short_circuit(execution_timeout=timedelta(minutes=10))
def needs_review(gated: dict | None) -> dict:
    # None: gate_and_promote returned nothing (e.g. marked success by `dags test --mark-success-pattern`)
    if not gated or gated.get("review") != "pending":
        return {}  # promoted automatically, or the gate kept the champion: nothing to ask
    from shoefix_tasks.pipeline import review_request

    return {**review_request(gated), "gated": gated}


@task(execution_timeout=timedelta(minutes=30), retries=3, trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS,
      on_success_callback=ShoeFixNotifier("champion"))
def apply_review(request: dict) -> dict:
    from shoefix_tasks.pipeline import apply_review as run

    ctx = get_current_context()
    response = ctx["ti"].xcom_pull(task_ids=REVIEW_TASK)  # None: it timed out (or failed) unanswered
    return run(ctx["run_id"], request["gated"], response, actor=ctx["dag"].dag_id)


def review_promotion(gated) -> None:
    from shoefix_tasks.policy import load_policy
    from shoefix_tasks.registry.review import OPTIONS

    request = needs_review(gated)
    pull = f"ti.xcom_pull(task_ids='{request.operator.task_id}')"
    review = HITLOperator(
        task_id=REVIEW_TASK, options=OPTIONS, multiple=False, retries=0, execution_timeout=timedelta(minutes=10),
        subject=f"{{{{ {pull}['subject'] }}}}", body=f"{{{{ {pull}['body'] }}}}",
        params={"comment": Param("", type="string", maxLength=2000,
                                 description="why (kept in the champion history and on the version)")},
        response_timeout=timedelta(hours=load_policy().promotion.review_timeout_hours),  # the wait for a person
    )
    request >> review >> apply_review(request)
