"""What a trigger may ask of a ShoeFix DAG, wired into Airflow: the Params (UI form and Airflow's
own validation) and the check the first task of every ShoeFix DAG runs. The rules themselves live
in `shoefix_tasks.ops.trigger`; the api-server refuses a bad REST trigger with 400 before a run exists
(plugins/shoefix_trigger_guard.py), but `airflow dags trigger` and `dags test -c` never pass
through it, hence the check in the task as well.
"""

from __future__ import annotations

from contextlib import contextmanager

from airflow.sdk import Param, get_current_context

TRIGGER_XCOM = "trigger"  # collect_qa's XCom key holding the validated values


def trigger_params(dag_id: str) -> dict[str, Param]:
    from shoefix_tasks.ops.trigger import param_schemas

    return {key: Param(**schema) for key, schema in param_schemas(dag_id).items()}


@contextmanager
def no_retry_on_permanent_errors():
    """Fail the task without retries on a `shoefix_tasks.errors.PermanentError` (a refused trigger, a
    tampered candidate, a node without the GPU a recipe needs, ...): a retry would fail the same way.
    Every other error is retried as the DAG's default_args say."""
    from airflow.sdk.exceptions import AirflowFailException

    from shoefix_tasks.errors import PermanentError

    try:
        yield
    except PermanentError as err:
        raise AirflowFailException(f"{type(err).__name__}: {err}") from err


def validated_conf() -> dict:
    """This run's params (declared defaults + the trigger's conf), checked and normalized by
    `shoefix_tasks.ops.trigger.validate_conf`; a refusal (TriggerRefused, a PermanentError) fails the
    task without retries when raised inside `no_retry_on_permanent_errors`."""
    from shoefix_tasks.ops.trigger import validate_conf

    ctx = get_current_context()
    return validate_conf(ctx["dag"].dag_id, dict(ctx["params"]))
