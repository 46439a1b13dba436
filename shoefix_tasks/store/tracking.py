"""MLflow at the edge: the tracking URI, the experiment, resumable runs, and tag values that fit."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

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


TAG_LIMIT = 4900  # characters of one tag value: under the 5,000 that MLflow stores have allowed


def fitted_json(value: list | dict, limit: int = TAG_LIMIT) -> str:
    """JSON of a list or dict in at most `limit` characters (at least 200), so every reader can parse what
    was written: cutting the text would leave JSON none can (the gate's reasons and forbidden claims are
    read back by the page and `shoefix status`). A string item longer than a fifth of the limit keeps its
    beginning, marked "… (cut)", so one long reason (the safety floor lists every claim) cannot push out
    the rest; then whole items go from the end, the last item saying how many ("… N more"; a dict's key
    "… more"). ASCII-escaped, so characters are bytes."""
    if not isinstance(value, (list, dict)) or limit < 200:
        raise TypeError(f"fitted_json takes a list or dict and a limit of at least 200, not {type(value).__name__}, {limit}")
    longest = limit // 5

    def short(item: Any) -> Any:
        return item[:longest] + "… (cut)" if isinstance(item, str) and len(item) > longest else item

    items = [(k, short(v)) for k, v in value.items()] if isinstance(value, dict) else [short(v) for v in value]

    def dump(keep: int) -> str:
        left = len(items) - keep
        if isinstance(value, dict):
            return json.dumps({**dict(items[:keep]), **({"… more": f"… {left} more"} if left else {})})
        return json.dumps(items[:keep] + ([f"… {left} more"] if left else []))

    if len(text := json.dumps(value)) <= limit:
        return text
    lo, hi = 0, len(items)  # the most items that fit: dump(keep) grows with keep
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(dump(mid)) <= limit else (lo, mid - 1)
    return dump(lo)


def json_tag(tags: dict[str, str], key: str, empty: Any) -> Any:
    """A JSON tag parsed, or its raw text where it is not JSON of `empty`'s type (versions registered
    before `fitted_json` had long tags cut at 4,900 characters)."""
    raw = tags.get(key)
    if not raw:
        return empty
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw
    return parsed if isinstance(parsed, type(empty)) else raw
