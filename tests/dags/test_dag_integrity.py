"""DAG integrity: every DAG imports, is configured as the house style requires, parses fast and
imports nothing heavy at parse time."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import dag_env

DAGS = Path(__file__).resolve().parents[2] / "dags"
HEAVY = ("torch", "transformers", "trl", "peft", "mlflow", "great_expectations", "bitsandbytes", "datasets")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "shoefix_weekly_retrain" in dagbag.dags


def test_dag_id_is_file_stem(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert Path(dag.fileloc).stem == dag_id


def test_house_style(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags and "shoefix" in dag.tags, dag_id
        assert dag.catchup is False, dag_id
        assert dag.start_date is not None and dag.start_date.tzinfo is not None, dag_id
        assert dag.doc_md and "Trigger" in dag.doc_md, dag_id
        for t in dag.tasks:
            if t.task_id == "review_promotion":  # a retry would ask the reviewer again and restart the wait
                assert t.retries == 0, f"{dag_id}.{t.task_id} must not retry"
                continue
            assert t.retries >= 1, f"{dag_id}.{t.task_id} has no retries"
            assert t.execution_timeout is not None and t.execution_timeout <= timedelta(hours=6), t.task_id


def test_one_run_at_a_time(dagbag):
    assert {"shoefix_weekly_retrain", "shoefix_urgent_update", "shoefix_rollback", "shoefix_inbox_watch"} <= set(dagbag.dags)
    for dag_id, dag in dagbag.dags.items():
        assert dag.max_active_runs == 1, dag_id


def test_weekly_graph(dagbag):
    dag = dagbag.dags["shoefix_weekly_retrain"]
    assert dag.max_active_runs == 1
    order = ["collect_qa", "validate_qa", "train_adapter", "evaluate_adapter", "gate_and_promote", "needs_review",
             "review_promotion", "apply_review"]
    assert set(order) | {"summarize_use"} == set(dag.task_ids)
    assert not dag.get_task("summarize_use").upstream_task_ids  # runs even when nothing new was collected
    for up, down in zip(order, order[1:], strict=False):
        assert down in dag.get_task(up).downstream_task_ids
    assert dag.timetable.expression == "0 3 * * 1" and str(dag.timetable.timezone) == "Asia/Taipei"


@pytest.mark.parametrize("dag_file", sorted(p.name for p in DAGS.glob("*.py")))
def test_no_heavy_imports_at_parse_time(dag_file):
    code = (f"import sys, runpy; runpy.run_path({str(DAGS / dag_file)!r}); "
            f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dag_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "HEAVY=", f"{dag_file} imports heavy modules at parse time"


def _with(dag, conf: dict):
    """The DAG's params with a trigger's conf applied, as Airflow does on trigger."""
    import copy

    params = copy.deepcopy(dag.params)
    params.update(conf)
    return params


def test_manual_dags_require_typed_params(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    for dag_id in ("shoefix_urgent_update", "shoefix_rollback"):
        dag = dagbag.dags[dag_id]
        assert dag.timetable.can_be_scheduled is False, dag_id
        with pytest.raises(ParamValidationError):
            _with(dag, {}).validate()  # no reason given
    urgent = dagbag.dags["shoefix_urgent_update"]
    assert _with(urgent, {"reason": "wrong drying temperature in v3"}).validate()["evaluation"] == "full"
    with pytest.raises(ParamValidationError):
        _with(urgent, {"reason": "a valid reason", "evaluation": "sloppy"}).validate()
    assert set(urgent.task_ids) | {"summarize_use"} == set(dagbag.dags["shoefix_weekly_retrain"].task_ids)


def test_params_come_from_the_trigger_rules(dagbag):
    """Each ShoeFix DAG declares exactly the conf keys shoefix_tasks.ops.trigger allows, with its schemas,
    so the UI form and Airflow's own validation agree with the tasks' and the api-server's check."""
    from airflow.sdk.exceptions import ParamValidationError

    from shoefix_tasks.ops.trigger import param_schemas

    for dag_id in ("shoefix_weekly_retrain", "shoefix_urgent_update", "shoefix_rollback"):
        dag = dagbag.dags[dag_id]
        schemas = param_schemas(dag_id)
        assert set(dag.params) == set(schemas), dag_id  # no max_quarantine_rate, no gate, no policy
        for key, schema in schemas.items():
            assert dag.params.get_param(key).schema == {k: v for k, v in schema.items()
                                                        if k not in ("default", "description")}, (dag_id, key)
    weekly = dagbag.dags["shoefix_weekly_retrain"]
    assert _with(weekly, {}).validate()["overrides"] == {}
    for bad in ({"recipe": "/tmp/evil.yaml"}, {"overrides": ["train.seed=1"]}, {"overrides": {"gate.min_effect": -9}},
                {"overrides": {"train.learning_rate": 5}}, {"overrides": {"train.max_steps": 0}}):
        with pytest.raises(ParamValidationError):
            _with(weekly, bad).validate()
    rollback = dagbag.dags["shoefix_rollback"]
    assert _with(rollback, {"version": 2, "reason": "v3 regressed"}).validate()["force"] is False
    with pytest.raises(ParamValidationError):
        _with(rollback, {"version": 2, "reason": "     "}).validate()


def test_every_dag_takes_its_timezone_from_config():
    """The weekly schedule and every DAG's start date follow SHOEFIX_TIMEZONE; none hard-codes one."""
    probe = ("import json; from airflow.dag_processing.dagbag import DagBag; "
             f"b = DagBag(dag_folder={str(DAGS)!r}); assert not b.import_errors, b.import_errors; "
             "print(json.dumps({i: [d.timezone.name, str(getattr(d.timetable, 'timezone', ''))] "
             "for i, d in b.dags.items()}))")
    proc = subprocess.run([sys.executable, "-c", probe], env=dag_env(SHOEFIX_TIMEZONE="Europe/Lisbon"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    zones = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert {"shoefix_weekly_retrain", "shoefix_urgent_update", "shoefix_rollback", "shoefix_inbox_watch"} <= set(zones)
    assert all(start == "Europe/Lisbon" for start, _ in zones.values()), zones
    assert zones["shoefix_weekly_retrain"][1] == "Europe/Lisbon", zones
