"""A person holds a promotion (policy `promotion.mode: review`), against a real `airflow api-server`.

Three `airflow dags test shoefix_weekly_retrain` runs of the tiny recipe on one state, each with new
Q&A, each stopping in the human-in-the-loop task `review_promotion` (AWAITING_INPUT) until:
1. a REST `PATCH .../taskInstances/review_promotion/-1/hitlDetails` rejects v1: no champion;
2. the same REST call approves v2: v2 is champion, the history names the reviewer and the comment;
3. nobody answers: Airflow's own timeout sweep (the scheduler's `check_awaiting_input_timeouts`,
   called once here because `dags test` runs no scheduler) fails the task after the policy's
   deadline; v3 is not promoted and the history says so.
Each time the registry (alias, version tags) and the champion history are checked. The lenient
test gate (tests/fixtures/policy/lenient.yaml) lets a random tiny model pass, so every run reaches
the review. A trigger asking for `promotion: auto` under this policy gets a 400 first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import FIXTURES, ROOT, write_policy
from tests.integration.conftest import http

WEEKLY = "shoefix_weekly_retrain"
MODEL = "shoefix-expert"
TIMEOUT_HOURS = 0.005  # 18 s: only the timeout sweep ever reads it, and it runs only in case 3
SWEEP = ("from airflow.jobs.job import Job; from airflow.jobs.scheduler_job_runner import SchedulerJobRunner; "
         "SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()")


@pytest.fixture()
def review_policy(shoefix_env, tiny_recipe, tmp_path, monkeypatch):
    """The lenient test gate, the tiny recipe's folder, and `promotion: review` with a short deadline;
    set before the api-server starts so it reads the same policy."""
    path = write_policy(tmp_path / "policy" / "review.yaml", [tiny_recipe.parent],
                        promotion={"mode": "review", "review_timeout_hours": TIMEOUT_HOURS})
    monkeypatch.setenv("SHOEFIX_POLICY", str(path))
    return path


def patch(url: str, token: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PATCH",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def start_run(srv, tmp_path, name: str) -> tuple[subprocess.Popen, object]:
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed by finish()
    proc = subprocess.Popen(["airflow", "dags", "test", WEEKLY, "-c", json.dumps({"recipe": "tiny"})],
                            env=srv["env"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def awaiting_review(srv, proc, log_path) -> tuple[str, dict]:
    """(run id, HITL detail) once the run's review task waits for a person."""
    deadline = time.time() + 1200
    while time.time() < deadline:
        assert proc.poll() is None, log_path.read_text()[-4000:]
        status, body = http(f"{srv['base']}/api/v2/dags/{WEEKLY}/dagRuns/~/hitlDetails", srv["token"], timeout=30)
        if status == 200:
            waiting = [d for d in json.loads(body)["hitl_details"] if not d["response_received"]]
            if waiting:
                return waiting[0]["task_instance"]["dag_run_id"], waiting[0]
        time.sleep(2)
    raise AssertionError("the run never reached review_promotion: " + log_path.read_text()[-4000:])


def finish(proc, log, log_path) -> str:
    proc.wait(timeout=600)
    log.close()
    out = log_path.read_text()
    assert proc.returncode == 0, out[-4000:]  # the run itself ends well, whatever the reviewer said
    return out


def states(srv, run_id: str) -> dict[str, str]:
    status, body = http(f"{srv['base']}/api/v2/dags/{WEEKLY}/dagRuns/{run_id}/taskInstances", srv["token"])
    assert status == 200, body
    return {t["task_id"]: t["state"] for t in json.loads(body)["task_instances"]}


def answer(srv, run_id: str, option: str, comment: str) -> dict:
    status, body = patch(f"{srv['base']}/api/v2/dags/{WEEKLY}/dagRuns/{run_id}/taskInstances/review_promotion/-1/"
                         "hitlDetails", srv["token"], {"chosen_options": [option], "params_input": {"comment": comment}})
    assert status == 200, body
    return json.loads(body)


def inbox_file(s, name: str, rows: list[str]) -> None:
    (s.home / "inbox" / name).write_text("".join(rows))


@pytest.mark.integration
@pytest.mark.slow
def test_review_reject_approve_and_timeout_through_the_rest_api(shoefix_env, review_policy, api_server, tmp_path):
    import mlflow

    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking

    s, srv = shoefix_env, api_server
    tracking.configure(s)
    client = mlflow.MlflowClient()
    small = (FIXTURES / "corpus_small.jsonl").read_text().splitlines(keepends=True)
    batches = [small[:6], small[6:], (FIXTURES / "corpus_more.jsonl").read_text().splitlines(keepends=True)]

    # a trigger may not loosen the policy: 400 from the api-server's trigger guard, before any run exists
    status, body = http(f"{srv['base']}/api/v2/dags/{WEEKLY}/dagRuns", srv["token"],
                        json_body={"logical_date": None, "conf": {"promotion": "auto"}})
    assert status == 400 and "promotion 'auto' refused" in body, body

    def run_until_review(i: int):
        inbox_file(s, f"week{i}.jsonl", batches[i - 1])
        proc, log = start_run(srv, tmp_path, f"run{i}")
        run_id, detail = awaiting_review(srv, proc, tmp_path / f"run{i}.log")
        assert detail["options"] == ["Approve", "Reject"] and detail["subject"].startswith(f"Promote {MODEL} v{i}")
        for part in ("**Gate: PROMOTE**", "Bootstrap intervals", "composite:", "Guard questions",
                     "answers that changed most"):
            assert part in detail["body"], detail["body"][:3000]
        assert int(registry.version_by_alias(registry.CHALLENGER).version) == i
        assert client.get_model_version(MODEL, str(i)).tags["review"] == "pending"
        return proc, log, run_id

    # 1. rejected through the REST API: no champion, the rejection and its reason recorded
    proc, log, run_id = run_until_review(1)
    assert registry.version_by_alias(registry.CHAMPION) is None  # the gate passed; the champion did not move
    answered = answer(srv, run_id, "Reject", "answers ramble; not yet")
    assert answered["responded_by"]["name"] == "shoefix"
    out = finish(proc, log, tmp_path / "run1.log")
    assert states(srv, run_id)["apply_review"] == "success", out[-3000:]
    assert registry.version_by_alias(registry.CHAMPION) is None
    tags = client.get_model_version(MODEL, "1").tags
    assert (tags["review"], tags["reviewed_by"], tags["review_comment"]) == ("rejected", "shoefix",
                                                                             "answers ramble; not yet")
    (row,) = registry.champion_history(s)
    assert (row["version"], row["previous_version"], row["action"]) == (1, None, "review-rejected")
    assert row["reason"] == "v1 rejected by shoefix: answers ramble; not yet" and row["actor"].startswith("shoefix (")

    # 2. approved through the REST API: v2 is champion, the history says who and why
    proc, log, run_id = run_until_review(2)
    answer(srv, run_id, "Approve", "checked the guard answers")
    out = finish(proc, log, tmp_path / "run2.log")
    assert states(srv, run_id)["apply_review"] == "success", out[-3000:]
    assert int(registry.version_by_alias(registry.CHAMPION).version) == 2
    last = registry.champion_history(s)[-1]
    assert (last["version"], last["previous_version"], last["action"]) == (2, None, "promote-reviewed")
    assert last["reason"].startswith("approved by shoefix: checked the guard answers | gate: ")
    assert last["actor"] == f"shoefix (review in {WEEKLY} run {run_id})"
    assert client.get_model_version(MODEL, "2").tags["review"] == "approved"

    # 3. nobody answers: after the deadline, Airflow's timeout sweep fails the review; v2 stays champion
    proc, log, run_id = run_until_review(3)
    time.sleep(TIMEOUT_HOURS * 3600 + 2)
    sweep = subprocess.run([sys.executable, "-c", SWEEP], env=srv["env"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    out = finish(proc, log, tmp_path / "run3.log")
    ti = states(srv, run_id)
    assert (ti["review_promotion"], ti["apply_review"]) == ("failed", "success"), out[-3000:]
    assert int(registry.version_by_alias(registry.CHAMPION).version) == 2
    assert client.get_model_version(MODEL, "3").tags["review"] == "timeout"
    last = registry.champion_history(s)[-1]
    assert (last["version"], last["previous_version"], last["action"]) == (3, 2, "review-timeout")
    assert last["reason"].startswith("v3 not promoted: no decision was recorded")
    # a rollback onto the version nobody approved is an override: it needs force
    with pytest.raises(registry.RollbackRefused, match="review did not approve it"):
        registry.rollback(s, 3, "try the unreviewed one", "test")
