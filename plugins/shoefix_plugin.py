"""ShoeFix's Airflow plugin: extra links from task instances to MLflow, and the ShoeFix page.

- Links: `train_adapter` and `evaluate_adapter` return dicts with their MLflow run ids, and
  `gate_and_promote` returns the registry version; these links turn them into buttons on the task
  instance page. The MLflow UI address comes from `SHOEFIX_MLFLOW_UI_URL`.
- Page: a FastAPI app mounted by the api-server at `/shoefix/` (shoefix_page.py), shown inside the
  Airflow UI as the nav entry "ShoeFix" (an external view embedded at `/plugin/shoefix`).

Every Airflow process (scheduler, workers, `airflow dags test`) loads plugins, so this module
imports nothing beyond Airflow: the page's app is built on its first request.
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


class LazyPageApp:
    """An ASGI app that builds the page's FastAPI app on first use (FastAPI and the page's
    imports cost ~1.5 s, which no process but the api-server should pay)."""

    def __init__(self) -> None:
        self._app = None

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            import importlib.util
            import sys
            from pathlib import Path

            name = "shoefix_page"
            if name not in sys.modules:  # a sibling file, listed in .airflowignore (not a plugin itself)
                spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("shoefix_page.py"))
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            self._app = sys.modules[name].build_app()
        await self._app(scope, receive, send)


class ShoeFixPlugin(AirflowPlugin):
    name = "shoefix"
    global_operator_extra_links = [MlflowRunLink(), MlflowRegistryLink()]
    fastapi_apps = [{"app": LazyPageApp(), "url_prefix": "/shoefix", "name": "ShoeFix page"}]
    # href is relative to the UI's base URL (works behind a proxy prefix); url_route embeds it in the UI
    external_views = [{"name": "ShoeFix", "href": "shoefix/", "destination": "nav", "url_route": "shoefix",
                       "nav_top_level": True}]
