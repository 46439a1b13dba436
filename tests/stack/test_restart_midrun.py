"""Issue 7, scenario 11: the scheduler, and separately the metadata DB (Postgres), restarted while
a run is in flight. The run completes; no inbox file is processed twice; no duplicate run or
registry version; no task instance is left running.

The run is an urgent update triggered through the api-server's REST API with a JWT (issue 6): one
run on this 2-core machine serves both checks.

The scheduler is SIGKILLed (no clean shutdown) and its supervisor loop starts a new one, which
adopts the orphaned Celery task. Postgres is stopped with `-m immediate` (a crash: no checkpoint)
for a few seconds while training runs, taking down Airflow's, MLflow's and the ledger's database
at once; every service must reconnect by itself.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.stack.conftest import inbox_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]
URGENT = "shoefix_urgent_update"
UNFINISHED = {"running", "queued", "scheduled", "restarting", "up_for_retry", "up_for_reschedule", "deferred"}


def test_urgent_update_via_rest_survives_scheduler_and_postgres_restarts(stack, stack_recipe, monkeypatch):
    import mlflow
    import sqlalchemy as sa

    from shoefix_tasks.store import ledger
    stack.wait_for_dag(URGENT)
    runs_before = stack.rest("GET", f"/dags/{URGENT}/dagRuns").json()["total_entries"]
    inbox_file(stack, "corpus_more.jsonl", "urgent/fix.jsonl")
    conf = {"reason": "v1 gives wrong drying temperatures", "files": ["urgent/fix.jsonl"], "evaluation": "quick",
            "recipe": stack_recipe}
    resp = stack.rest("POST", f"/dags/{URGENT}/dagRuns", json={"logical_date": None, "conf": conf})
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["dag_run_id"]

    # fault 1: the scheduler dies while train_adapter runs on the worker
    stack.wait_until(lambda: stack.task_instances(URGENT, run_id)["train_adapter"]["state"] == "running",
                     "train_adapter to start", 600, every_s=2)
    stack.script("kill-scheduler")
    # fault 2: the metadata DB (and MLflow's and the ledger's) crashes while the run is still in flight
    stack.wait_until(lambda: stack.run_state(URGENT, run_id) == "running", "the run to be running", 120)
    stack.script("restart-postgres", extra_env={"DOWN_S": "5"})
    state = stack.wait_run(URGENT, run_id, timeout_s=1200)
    tis = stack.task_instances(URGENT, run_id)
    assert state == "success", {t: (ti["state"], ti["try_number"]) for t, ti in tis.items()}
    assert tis["train_adapter"]["queue"] == "gpu"

    # no duplicate run: exactly one more run of the DAG, and it is ours
    runs = stack.rest("GET", f"/dags/{URGENT}/dagRuns").json()
    assert runs["total_entries"] == runs_before + 1
    assert Counter(r["dag_run_id"] for r in runs["dag_runs"])[run_id] == 1
    # nothing stuck: every task instance of every run of every DAG is finished
    for dag_id in ("shoefix_weekly_retrain", "shoefix_urgent_update"):
        for r in stack.rest("GET", f"/dags/{dag_id}/dagRuns").json()["dag_runs"]:
            assert r["state"] in ("success", "failed")
            for task_id, ti in stack.task_instances(dag_id, r["dag_run_id"]).items():
                assert ti["state"] not in UNFINISHED, (dag_id, r["dag_run_id"], task_id, ti["state"])

    # no file processed twice: each inbox file once, each of its lines in exactly one batch
    engine = ledger.engine_for(stack.env["SHOEFIX_LEDGER_URL"])
    engine.dispose()  # this test process's pooled connections died with the server they came from
    with engine.connect() as c:
        files = c.execute(sa.select(ledger.inbox_files.c.name, ledger.inbox_files.c.batch_id,
                                    ledger.inbox_files.c.status)).all()
        lines = c.execute(sa.select(ledger.records.c.file_sha, ledger.records.c.line_no)).all()
    assert [f.batch_id for f in files if f.name.endswith("fix.jsonl")] == [run_id]  # once, by this run
    assert len(lines) == len(set(lines)), "a line of an inbox file was ledgered twice"

    # no duplicate registry version: one per training run, and exactly one for this pipeline run
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, stack.env[key])
    client = mlflow.MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
    versions = client.search_model_versions("name='shoefix-expert'")
    assert len({v.tags["training_run"] for v in versions}) == len(versions)
    assert [v.tags["pipeline_run"] for v in versions].count(run_id) == 1
    mine = next(v for v in versions if v.tags["pipeline_run"] == run_id)
    v1 = client.get_model_version("shoefix-expert", "1")
    # scored against the champion the weekly run left (v1 if its gate promoted it, else the base)
    assert mine.tags["challenged"] == ("v1" if v1.tags["gate_decision"] == "promote" else "base")
    train_runs = client.search_runs([client.get_experiment_by_name("shoefix").experiment_id],
                                    filter_string=f"tags.`shoefix.stage` = 'train' and tags.`shoefix.run_key` = '{run_id}'")
    assert len(train_runs) == 1
    # the scheduler really was replaced (its supervisor restarted it) and the DB really went down
    assert "exited with 137" in (stack.state / "logs" / "scheduler.log").read_text()
    pg_log = (stack.state / "logs" / "postgres.log").read_text()
    assert "received immediate shutdown request" in pg_log and pg_log.count("database system is ready") >= 2
