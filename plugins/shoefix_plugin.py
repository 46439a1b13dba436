"""ShoeFix's Airflow plugin: extra links from task instances to MLflow.

`train_adapter` and `evaluate_adapter` return dicts with their MLflow run ids, and
`gate_and_promote` returns the registry version; these links turn them into buttons on the task
instance page. The MLflow UI address comes from `SHOEFIX_MLFLOW_UI_URL`.
"""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom


def _mlflow_ui() -> str:
    return os.environ.get("SHOEFIX_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


def _returned(ti_key) -> dict:
    value = XCom.get_value(ti_key=ti_key, key="return_value")
    return value if isinstance(value, dict) else {}


class MlflowRunLink(BaseOperatorLink):
    name = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        ret = _returned(ti_key)
        run_id = ret.get("eval_run_id") or ret.get("run_id")
        exp = ret.get("experiment_id", "0")
        return f"{_mlflow_ui()}/#/experiments/{exp}/runs/{run_id}" if run_id else ""


class MlflowRegistryLink(BaseOperatorLink):
    name = "Registry version"

    def get_link(self, operator, *, ti_key) -> str:
        version = _returned(ti_key).get("version")
        return f"{_mlflow_ui()}/#/models/shoefix-expert/versions/{version}" if version else ""


class ShoeFixPlugin(AirflowPlugin):
    name = "shoefix"
    global_operator_extra_links = [MlflowRunLink(), MlflowRegistryLink()]
