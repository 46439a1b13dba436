"""MLflow at the edge: the tracking URI, the experiment, and resumable runs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from shoefix_tasks.config import EXPERIMENT, Settings

log = logging.getLogger(__name__)


def configure(settings: Settings) -> str:
    """Point MLflow at this installation's store; create the experiment with our artifact root.

    Returns the experiment id. With a SQLite store MLflow would otherwise put artifacts under
    ./mlruns of whatever folder the process started in.
    """
    import mlflow

    # Never unpickle a model: ours are models-from-code, so a pickled one is foreign (MLflow allows
    # it by default; this makes `pyfunc.load_model` refuse cloudpickle-format models).
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        try:
            exp_id = client.create_experiment(EXPERIMENT, artifact_location=settings.artifact_root)
        except Exception:  # another process created it first
            exp = client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def run_for(stage: str, run_key: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """The MLflow run of one stage of one pipeline run: found by tags on retry, created otherwise.

    Keyed in MLflow itself (not on a worker's disk), so a retry on another worker finds it too.
    """
    import mlflow

    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`shoefix.stage` = '{stage}' and tags.`shoefix.run_key` = '{run_key}'",
        max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        log.info("resuming MLflow %s run %s", stage, found[0].info.run_id)
        return found[0].info.run_id
    all_tags = {"shoefix.stage": stage, "shoefix.run_key": run_key, **(tags or {})}
    return client.create_run(experiment_id=exp_id, run_name=run_name, tags=all_tags).info.run_id


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics of one moment in one request (`log_batch`, one timestamp), not one request each: every
    request to an authenticated server costs a credential check."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])
