"""What a trigger may ask of a ShoeFix DAG, wired into Airflow: the Params (UI form and Airflow's
own validation) and the check the first task of every ShoeFix DAG runs. The rules themselves live
in `shoefix_tasks.trigger`; the api-server refuses a bad REST trigger with 400 before a run exists
(plugins/shoefix_trigger_guard.py), but `airflow dags trigger` and `dags test -c` never pass
through it, hence the check in the task as well.
"""

from __future__ import annotations

from airflow.sdk import Param, get_current_context

TRIGGER_XCOM = "trigger"  # collect_qa's XCom key holding the validated values


def trigger_params(dag_id: str) -> dict[str, Param]:
    from shoefix_tasks.trigger import param_schemas

    return {key: Param(**schema) for key, schema in param_schemas(dag_id).items()}


def validated_conf() -> dict:
    """This run's params (declared defaults + the trigger's conf), checked and normalized by
    `shoefix_tasks.trigger.validate_conf`; a refusal fails the task without retries (the same conf
    would be refused again)."""
    from airflow.sdk.exceptions import AirflowFailException

    from shoefix_tasks.trigger import TriggerRefused, validate_conf

    ctx = get_current_context()
    try:
        return validate_conf(ctx["dag"].dag_id, dict(ctx["params"]))
    except TriggerRefused as err:
        raise AirflowFailException(f"trigger refused: {err}") from err
