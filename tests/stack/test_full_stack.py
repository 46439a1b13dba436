"""Issue 6's deployment, natively: the weekly DAG through the real scheduler and a Celery worker,
training observed on queue `gpu`; MLflow reached over HTTP with auth; the ledger in Postgres; an
urgent update triggered through the api-server's REST API with a JWT, its params validated.

Tests run in file order and share one stack: each builds on the registry the last one left.
"""

from __future__ import annotations

import json

import pytest

from tests.stack.conftest import inbox_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WEEKLY, URGENT = "shoefix_weekly_retrain", "shoefix_urgent_update"


def _mlflow_client(stack, monkeypatch):
    import mlflow

    # the pipeline's own (non-admin) user, from the environment, as the workers use it
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, stack.env[key])
    return mlflow.MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)


def _ledger(stack):
    from shoefix_tasks.store import ledger
    return ledger.engine_for(stack.env["SHOEFIX_LEDGER_URL"])


def test_weekly_dag_completes_through_scheduler_with_training_on_gpu_queue(stack, stack_recipe, monkeypatch):
    import requests
    import sqlalchemy as sa

    from shoefix_tasks.store import ledger
    inbox_file(stack, "corpus_small.jsonl", "week1.jsonl")
    stack.wait_for_dag(WEEKLY)
    out = stack.airflow("dags", "trigger", WEEKLY, "-c", json.dumps({"recipe": stack_recipe}), "-o", "json")
    # the CLI's JSON is its last line (warnings go to stdout before it)
    run_id = json.loads([ln for ln in out.splitlines() if ln.startswith("[{")][-1])[0]["dag_run_id"]
    assert stack.wait_run(WEEKLY, run_id) == "success"

    tis = stack.task_instances(WEEKLY, run_id)
    assert {t: ti["state"] for t, ti in tis.items()} == {**dict.fromkeys(
        ["collect_qa", "validate_qa", "train_adapter", "evaluate_adapter", "gate_and_promote", "needs_review",
         "summarize_use"], "success"), "review_promotion": "skipped", "apply_review": "skipped"}  # mode auto: no review
    assert tis["train_adapter"]["queue"] == "gpu" and tis["train_adapter"]["pool"] == "gpu"
    assert {tis[t]["queue"] for t in tis if t != "train_adapter"} == {"default"}
    worker_log = (stack.state / "logs" / "worker.log").read_text()
    received = [ln for ln in worker_log.splitlines() if "Executing workload" in ln and "task_id=train_adapter" in ln]
    assert received and all("queue='gpu'" in ln for ln in received)

    # MLflow over HTTP: the version and both runs are on the server, written by the pipeline's user
    client = _mlflow_client(stack, monkeypatch)
    versions = client.search_model_versions("name='shoefix-expert'")
    assert [int(v.version) for v in versions] == [1]
    v1 = versions[0]
    assert v1.tags["pipeline_run"] == run_id and v1.tags["challenged"] == "base"
    # one epoch on a random tiny model may tie the base (ties keep the champion): either way the
    # aliases must agree with the recorded decision
    assert v1.tags["gate_decision"] in ("promote", "keep_champion")
    assert int(client.get_model_version_by_alias("shoefix-expert", "challenger").version) == 1
    if v1.tags["gate_decision"] == "promote":
        assert int(client.get_model_version_by_alias("shoefix-expert", "champion").version) == 1
    else:
        assert "champion" not in (client.get_registered_model("shoefix-expert").aliases or {})
    train_run = client.get_run(v1.tags["training_run"])
    assert train_run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not a worker's disk
    assert any(p.name.endswith(".safetensors") for p in (stack.state / "mlflow-artifacts").rglob("*"))
    names = {f.path for f in client.list_artifacts(train_run.info.run_id, "adapter")}
    assert "adapter/shoefix_manifest.json" in names
    # the pipeline's own user created (so owns) the model; it is not the admin
    admin = stack.secrets["MLFLOW_AUTH_ADMIN_USERNAME"], stack.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"]
    perms = requests.get(f"{stack.mlflow}/api/3.0/mlflow/users/permissions/list", auth=admin, timeout=30,
                         params={"username": stack.env["MLFLOW_TRACKING_USERNAME"]})
    assert perms.status_code == 200, perms.text
    assert perms.json()["is_admin"] is False
    owned = {(p["resource_type"], p["resource_pattern"]): p["permission"] for p in perms.json()["permissions"]}
    assert owned[("registered_model", "shoefix-expert")] == "MANAGE"
    # ... and nobody without credentials gets in, nor with wrong ones
    url = f"{stack.mlflow}/api/2.0/mlflow/registered-models/get"
    assert requests.get(url, params={"name": "shoefix-expert"}, timeout=30).status_code == 401
    assert requests.get(url, params={"name": "shoefix-expert"}, auth=("shoefix-pipeline", "wrong"),
                        timeout=30).status_code == 401
    assert stack.rest("GET", "/dags", auth=False).status_code == 401

    # the ledger in Postgres: the batch of this run, every record accounted for
    engine = _ledger(stack)
    assert engine.dialect.name == "postgresql"
    counts = ledger.status_counts(engine, run_id)
    assert counts["accepted"] == 12 and sum(counts.values()) == 12
    with engine.connect() as c:
        files = c.execute(sa.select(ledger.inbox_files.c.name, ledger.inbox_files.c.batch_id)).all()
    assert [(f.name, f.batch_id) for f in files] == [("week1.jsonl", run_id)]


def test_urgent_update_params_are_validated_by_the_rest_api(stack, stack_recipe):
    """The urgent run itself is triggered through REST in test_restart_midrun (under faults)."""
    stack.wait_for_dag(URGENT)
    path = f"/dags/{URGENT}/dagRuns"
    good = {"reason": "v1 gives wrong drying temperatures", "files": ["urgent/fix.jsonl"],
            "evaluation": "quick", "recipe": stack_recipe}
    assert stack.rest("POST", path, json={"logical_date": None, "conf": good}, auth=False).status_code == 401
    # without the required `reason`, or with an `evaluation` outside its enum: refused, no run created
    bad = {k: v for k, v in good.items() if k != "reason"}
    resp = stack.rest("POST", path, json={"logical_date": None, "conf": bad})
    assert resp.status_code == 400, resp.text
    assert "reason" in resp.text
    resp = stack.rest("POST", path, json={"logical_date": None, "conf": {**good, "evaluation": "sometimes"}})
    assert resp.status_code == 400, resp.text
    # policy is not the trigger's to change (the guard, under the FAB auth manager): refused, no run
    for bad, phrase in [({**good, "gate": {"min_effect": -100}}, "['gate']"),
                        ({**good, "overrides": {"eval.include_guard": False}}, "'eval.include_guard'"),
                        ({**good, "recipe": str(stack.state / "recipes" / "tiny.yaml")}, "recipe must be")]:
        resp = stack.rest("POST", path, json={"logical_date": None, "conf": bad})
        assert resp.status_code == 400 and phrase in resp.json()["detail"], resp.text
    assert stack.rest("POST", path, json={"logical_date": None, "conf": {**good, "gate": {}}},
                      auth=False).status_code == 401  # unauthenticated: Airflow's 401, not the policy
    assert stack.rest("GET", path).json()["total_entries"] == 0
