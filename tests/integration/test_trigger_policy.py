"""The threat model includes the trigger: every attempt to change policy or read outside the inbox
through a DAG's conf is refused by a real `airflow api-server` with 400 and creates no run; a valid
conf still creates one; an unauthenticated caller gets Airflow's 401, never a policy message. And
`airflow dags test -c` (which never passes through the api-server) fails in the first task with the
same message.

Run with `-s` to see the table of attempts, statuses and messages.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, airflow_env, write_policy
from tests.integration.conftest import http

URGENT, WEEKLY, ROLLBACK = "shoefix_urgent_update", "shoefix_weekly_retrain", "shoefix_rollback"
REASON = "v3 gives wrong drying temperatures"


@pytest.fixture()
def test_policy(shoefix_env, tmp_path, monkeypatch):
    """The production gate (built-in) with a test recipe folder holding `tiny.yaml`; SHOEFIX_POLICY
    is set before the api-server starts, so it and `dags reserialize` read it too."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copyfile(ROOT / "shoefix_tasks" / "recipes" / "default.yaml", recipes / "tiny.yaml")
    path = write_policy(tmp_path / "policy.yaml", [recipes], base=None)
    monkeypatch.setenv("SHOEFIX_POLICY", str(path))
    return path


@pytest.fixture()
def server(test_policy, api_server):
    """The api-server with the DAGs serialized into its database (no scheduler: a run stays queued)."""
    proc = subprocess.run(["airflow", "dags", "reserialize"], env=api_server["env"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for dag in (URGENT, WEEKLY, ROLLBACK):
        assert http(f"{api_server['base']}/api/v2/dags/{dag}", api_server["token"])[0] == 200, dag
    return api_server


def trigger(srv, dag_id: str, conf, token: str | None = "default", **kw) -> tuple[int, str]:
    token = srv["token"] if token == "default" else token
    return http(f"{srv['base']}/api/v2/dags/{dag_id}/dagRuns", token,
                json_body={"logical_date": None, "conf": conf}, **kw)


def runs(srv, dag_id: str) -> list[dict]:
    status, body = http(f"{srv['base']}/api/v2/dags/{dag_id}/dagRuns", srv["token"])
    assert status == 200, body
    return json.loads(body)["dag_runs"]


def bypass_attempts(inbox, tmp_path) -> list[tuple[str, str, dict, str]]:
    """(what, dag_id, conf, a phrase the refusal must contain)."""
    (tmp_path / "other").mkdir(exist_ok=True)
    (inbox / "escape").symlink_to(tmp_path / "other")
    u = {"reason": REASON}
    return [
        ("recipe as an absolute path", URGENT, {**u, "recipe": "/tmp/evil.yaml"}, "recipe must be a recipe name"),
        ("recipe as ../x", URGENT, {**u, "recipe": "../default"}, "recipe must be a recipe name"),
        ("recipe as x.yaml", URGENT, {**u, "recipe": "tiny.yaml"}, "recipe must be a recipe name"),
        ("unknown recipe name", URGENT, {**u, "recipe": "nope"}, "no recipe named 'nope'"),
        ("overrides gate.min_effect", URGENT, {**u, "overrides": {"gate.min_effect": -100}}, "'gate.min_effect'"),
        ("overrides eval.latency_samples", URGENT, {**u, "overrides": {"eval.latency_samples": 0}},
         "'eval.latency_samples'"),
        ("overrides eval.include_guard", URGENT, {**u, "overrides": {"eval.include_guard": False}},
         "'eval.include_guard'"),
        ("overrides model.base_model", URGENT, {**u, "overrides": {"model.base_model": "/tmp/evil"}},
         "'model.base_model'"),
        ("train.learning_rate out of bounds", URGENT, {**u, "overrides": {"train.learning_rate": 5}},
         "train.learning_rate = 5 is out of bounds"),
        ("train.learning_rate NaN", URGENT, {**u, "overrides": {"train.learning_rate": float("nan")}},
         "train.learning_rate must be a finite number"),
        ("unknown train key", URGENT, {**u, "overrides": {"train.nope": 1}}, "'train.nope'"),
        ("old list form of overrides", URGENT, {**u, "overrides": ["gate.min_effect=-100"]},
         "must be a JSON object"),
        ("top-level gate", URGENT, {**u, "gate": {"min_effect": -100}}, "['gate']"),
        ("top-level policy", URGENT, {**u, "policy": "/tmp/lenient.yaml"}, "['policy']"),
        ("top-level max_quarantine_rate", URGENT, {**u, "max_quarantine_rate": 1}, "['max_quarantine_rate']"),
        ("inbox /etc", URGENT, {**u, "inbox": "/etc"}, "outside the allowed inbox roots"),
        ("inbox <inbox>/../other", URGENT, {**u, "inbox": f"{inbox}/../other"}, "'..'"),
        ("inbox symlink pointing out", URGENT, {**u, "inbox": str(inbox / "escape")}, "outside the allowed"),
        ("whitespace-only reason", URGENT, {"reason": "      "}, "at least 5 non-whitespace"),
        ("weekly: overrides gate", WEEKLY, {"overrides": {"gate.guard_tolerance": 100}}, "'gate.guard_tolerance'"),
        ("weekly: recipe path", WEEKLY, {"recipe": str(tmp_path / "recipes" / "tiny.yaml")}, "recipe must be"),
        ("weekly: top-level evaluation", WEEKLY, {"evaluation": "quick"}, "['evaluation']"),
        ("rollback: force as a string", ROLLBACK, {"version": 1, "reason": REASON, "force": "yes"},
         "force must be true or false"),
    ]


@pytest.mark.integration
def test_every_bypass_attempt_is_refused_with_400_and_no_run(shoefix_env, server, tmp_path):
    inbox = shoefix_env.home / "inbox"
    results = []
    # no credential, or a forged one: Airflow's own answer, never a policy message
    bad = {"reason": REASON, "gate": {"min_effect": -100}}
    status, body = trigger(server, URGENT, bad, token=None)
    results.append(("no token, bad conf", URGENT, status, body))
    assert status == 401 and "gate" not in body
    status, body = trigger(server, URGENT, bad, token="not-a-jwt")
    results.append(("forged token, bad conf", URGENT, status, body))
    assert status in (401, 403) and "gate" not in body and "inbox" not in body

    for what, dag_id, conf, phrase in bypass_attempts(inbox, tmp_path):
        status, body = trigger(server, dag_id, conf)
        results.append((what, dag_id, status, body))
        assert status == 400, (what, status, body)
        detail = json.loads(body)["detail"]
        assert detail.startswith("trigger refused:") and phrase in detail, (what, detail)

    # backfills carry a conf too (body key dag_run_conf), dry runs included
    backfill = {"dag_id": WEEKLY, "from_date": "2026-01-05T00:00:00Z", "to_date": "2026-01-20T00:00:00Z",
                "dag_run_conf": {"overrides": {"gate.min_effect": -100}}}
    for path in ("/api/v2/backfills", "/api/v2/backfills/dry_run"):
        status, body = http(server["base"] + path, server["token"], json_body=backfill)
        results.append((f"backfill {path.rsplit('/', 1)[-1]}: overrides gate", WEEKLY, status, body))
        assert status == 400 and "'gate.min_effect'" in json.loads(body)["detail"], body
    status, body = http(f"{server['base']}/api/v2/backfills?dag_id={WEEKLY}", server["token"])
    assert status == 200 and json.loads(body)["total_entries"] == 0, body

    for dag_id in (URGENT, WEEKLY, ROLLBACK):
        assert runs(server, dag_id) == [], f"a refused trigger created a run of {dag_id}"

    # a valid conf: accepted, one run, with exactly the conf that was sent
    good = {"reason": REASON, "files": ["urgent/fix.jsonl"], "evaluation": "quick", "recipe": "tiny",
            "inbox": str(inbox / "urgent"), "overrides": {"train.learning_rate": 1e-4, "train.max_steps": 5}}
    status, body = trigger(server, URGENT, good)
    results.append(("valid conf", URGENT, status, body[:80]))
    assert status == 200, body
    made = runs(server, URGENT)
    assert len(made) == 1 and made[0]["conf"] == good and made[0]["dag_run_id"] == json.loads(body)["dag_run_id"]
    status, body = trigger(server, WEEKLY, {"recipe": "tiny"})
    assert status == 200, body
    status, body = trigger(server, WEEKLY, {"recipe": "tiny"}, token=None)  # the guard never replaces a 401
    assert status == 401

    print("\nbypass attempts through the REST API (status, answer):")
    for what, dag_id, status, body in results:
        print(f"  {what:<40} {dag_id:<24} {status}  {body[:200]}")


@pytest.mark.integration
@pytest.mark.slow
def test_dags_test_with_a_bad_conf_fails_in_the_first_task(shoefix_env, test_policy, airflow_home):
    """No api-server in the way: the first task refuses the conf, without retries, and nothing runs."""
    env = airflow_env(shoefix_env, airflow_home)  # its DB already migrated
    conf = {"reason": REASON, "gate": {"min_effect": -100}}
    proc = subprocess.run(["airflow", "dags", "test", URGENT, "-c", json.dumps(conf)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    # the same refusal as the REST API's, raised as the task's failure (errors.PermanentError's type first)
    assert "TriggerRefused: shoefix_urgent_update does not accept conf key(s) ['gate']" in out, out[-4000:]
    assert "AirflowFailException" in out or "FailException" in out, out[-4000:]
    assert "state=failed" in out or proc.returncode != 0, out[-4000:]
    assert "up_for_retry" not in out.lower(), "a refused conf must not be retried"
    assert not (shoefix_env.home / "ledger.db").exists() and not shoefix_env.runs_dir.exists()  # nothing ran
    print("\n" + "\n".join(ln[:300] for ln in out.splitlines() if "TriggerRefused" in ln or "state=" in ln))
