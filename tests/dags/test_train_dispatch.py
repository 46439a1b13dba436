"""`train_adapter` under each SHOEFIX_TRAIN_DISPATCH setting: the DAGs parse, the task has the right
operator, queue and pool, and parsing imports nothing heavy even when it builds a pod operator."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import dag_env

DAGS = Path(__file__).resolve().parents[2] / "dags"
HEAVY = ("torch", "transformers", "trl", "peft", "mlflow", "bitsandbytes", "datasets")
RETRAIN_DAGS = ("shoefix_weekly_retrain", "shoefix_urgent_update")


def _dagbag(monkeypatch, **env):
    from airflow.dag_processing.dagbag import DagBag

    for k in ("SHOEFIX_TRAIN_DISPATCH", "SHOEFIX_K8S_IMAGE", "SHOEFIX_K8S_NODE_SELECTOR"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    start = time.perf_counter()
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag, time.perf_counter() - start


@pytest.mark.parametrize("mode, queue", [("local", "default"), ("celery", "gpu")])
def test_task_routing(monkeypatch, mode, queue):
    bag, _ = _dagbag(monkeypatch, SHOEFIX_TRAIN_DISPATCH=mode)
    for dag_id in RETRAIN_DAGS:
        t = bag.dags[dag_id].get_task("train_adapter")
        assert t.task_type == "_PythonDecoratedOperator"
        assert (t.queue, t.pool) == (queue, "gpu"), dag_id
        assert "evaluate_adapter" in t.downstream_task_ids and "validate_qa" in t.upstream_task_ids


def test_kubernetes_pod_operator(monkeypatch):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    bag, _ = _dagbag(monkeypatch, SHOEFIX_TRAIN_DISPATCH="kubernetes", SHOEFIX_K8S_IMAGE="shoefix/trainer:9",
                     SHOEFIX_K8S_NODE_SELECTOR=json.dumps({"pool": "h200"}))
    for dag_id in RETRAIN_DAGS:
        dag = bag.dags[dag_id]
        t = dag.get_task("train_adapter")
        assert isinstance(t, KubernetesPodOperator) and t.image == "shoefix/trainer:9"
        assert t.pool == "gpu" and t.queue == "default" and t.node_selector == {"pool": "h200"}
        assert t.retries >= 1 and t.execution_timeout is not None
        assert t.do_xcom_push  # evaluate_adapter reads the trainer's result from the pod's XCom
        assert "evaluate_adapter" in t.downstream_task_ids and "validate_qa" in t.upstream_task_ids
        assert set(dag.get_task("evaluate_adapter").upstream_task_ids) == {"train_adapter"}


def test_parsing_stays_light_under_kubernetes():
    code = ("import sys, runpy; "
            f"runpy.run_path({str(DAGS / 'shoefix_weekly_retrain.py')!r}); "
            f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    env = {**dag_env(), "SHOEFIX_TRAIN_DISPATCH": "kubernetes"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="
