"""ShoeFix's Airflow plugin: extra links from task instances to MLflow, the ShoeFix page, and the
trigger guard.

- Links: `train_adapter` and `evaluate_adapter` return dicts with their MLflow run ids, and
  `gate_and_promote` returns the registry version; these links turn them into buttons on the task
  instance page. The MLflow UI address comes from `SHOEFIX_MLFLOW_UI_URL`.
- Page: a FastAPI app mounted by the api-server at `/shoefix/` (shoefix_page.py), shown inside the
  Airflow UI as the nav entry "ShoeFix" (an external view embedded at `/plugin/shoefix`).
- Trigger guard: an ASGI middleware of the api-server (shoefix_trigger_guard.py) that answers 400
  to a REST trigger or backfill of a ShoeFix DAG whose conf breaks shoefix_tasks.ops.trigger, before
  Airflow creates a run.

Every Airflow process (scheduler, workers, `airflow dags test`) loads plugins, so this module
imports nothing beyond Airflow: the page's app is built on its first request, and the guard
module imports only the standard library until a ShoeFix trigger arrives.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

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


def _sibling(name: str):
    """A module next to this file, listed in .airflowignore (so not loaded as a plugin itself)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class LazyPageApp:
    """An ASGI app that builds the page's FastAPI app on first use (FastAPI and the page's
    imports cost ~1.5 s, which no process but the api-server should pay)."""

    def __init__(self) -> None:
        self._app = None

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            self._app = _sibling("shoefix_page").build_app()
        await self._app(scope, receive, send)


class ShoeFixPlugin(AirflowPlugin):
    name = "shoefix"
    global_operator_extra_links = [MlflowRunLink(), MlflowRegistryLink()]
    fastapi_apps = [{"app": LazyPageApp(), "url_prefix": "/shoefix", "name": "ShoeFix page"}]
    # the api-server adds it with app.add_middleware(middleware, *args, **kwargs)
    fastapi_root_middlewares = [{"middleware": _sibling("shoefix_trigger_guard").TriggerGuard, "args": [],
                                 "kwargs": {}, "name": "ShoeFix trigger guard"}]
    # href is relative to the UI's base URL (works behind a proxy prefix); url_route embeds it in the UI
    external_views = [{"name": "ShoeFix", "href": "shoefix/", "destination": "nav", "url_route": "shoefix",
                       "nav_top_level": True}]
