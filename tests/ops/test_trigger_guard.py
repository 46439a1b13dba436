"""The api-server's trigger guard as an ASGI app in front of a recording app: which requests it
checks, that a request it lets through reaches Airflow with the exact body it read, and that it
never answers for a caller without a credential. The real api-server (auth included) is exercised
in tests/integration/test_trigger_policy.py; here only the auth manager's verdict is stubbed."""

from __future__ import annotations

import asyncio
import importlib.util
import json

import pytest

from tests.conftest import ROOT


@pytest.fixture()
def guard(monkeypatch):
    spec = importlib.util.spec_from_file_location("shoefix_trigger_guard_t", ROOT / "plugins" / "shoefix_trigger_guard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    verdict = {"allowed": True}

    async def may_trigger(token, dag_id):
        return verdict["allowed"]

    monkeypatch.setattr(module, "may_trigger", may_trigger)
    module.verdict = verdict
    return module


class Downstream:
    """Stands in for Airflow: records the body it receives and answers 200."""

    def __init__(self):
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def call(app, path: str, body: bytes, method: str = "POST", headers=None, chunk: int = 7):
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers
             if headers is not None else [(b"authorization", b"Bearer header.payload.sig")]}
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def payload(conf) -> bytes:
    return json.dumps({"logical_date": None, "conf": conf}).encode()


def test_bad_conf_is_answered_400_and_never_reaches_airflow(guard, monkeypatch):
    monkeypatch.delenv("SHOEFIX_POLICY", raising=False)
    down = Downstream()
    app = guard.TriggerGuard(down)
    status, body = call(app, "/api/v2/dags/shoefix_weekly_retrain/dagRuns", payload({"gate": {"min_effect": -1}}))
    assert status == 400 and json.loads(body)["detail"].startswith("trigger refused:") and down.bodies == []
    status, body = call(app, "/api/v2/backfills/dry_run",
                        json.dumps({"dag_id": "shoefix_weekly_retrain", "dag_run_conf": {"policy": "x"}}).encode())
    assert status == 400 and "['policy']" in json.loads(body)["detail"]


def test_good_conf_reaches_airflow_byte_for_byte(guard, monkeypatch):
    monkeypatch.delenv("SHOEFIX_POLICY", raising=False)
    down = Downstream()
    app = guard.TriggerGuard(down)
    body = payload({"recipe": "default", "overrides": {"train.learning_rate": 1e-4}}) + b"   "
    assert call(app, "/api/v2/dags/shoefix_weekly_retrain/dagRuns", body)[0] == 200
    assert down.bodies == [body]
    body = json.dumps({"dag_id": "someone_else", "dag_run_conf": {"gate": 1}}).encode()
    assert call(app, "/api/v2/backfills", body)[0] == 200 and down.bodies[-1] == body  # not a ShoeFix DAG


@pytest.mark.parametrize("path,method,headers", [
    ("/api/v2/dags/shoefix_weekly_retrain/dagRuns", "POST", []),  # no credential: Airflow's 401
    ("/api/v2/dags/shoefix_weekly_retrain/dagRuns", "GET", None),  # listing runs
    ("/api/v2/dags/other_dag/dagRuns", "POST", None),  # not ours
    ("/api/v2/dags/shoefix_weekly_retrain/dagRuns/x/clear", "POST", None),  # no conf there
])
def test_passes_through_untouched(guard, path, method, headers):
    down = Downstream()
    body = payload({"gate": {"min_effect": -100}})
    assert call(guard.TriggerGuard(down), path, body, method=method, headers=headers)[0] == 200
    assert down.bodies == [body]


def test_a_caller_airflow_would_refuse_gets_airflows_answer(guard):
    guard.verdict["allowed"] = False  # bad token, or not allowed to trigger: Airflow says 401/403 itself
    down = Downstream()
    body = payload({"gate": {"min_effect": -100}})
    assert call(guard.TriggerGuard(down), "/api/v2/dags/shoefix_urgent_update/dagRuns", body)[0] == 200
    assert down.bodies == [body]


def test_credential_precedence(guard):
    assert guard.credential({"headers": [(b"authorization", b"Bearer abc")]}) == "abc"
    assert guard.credential({"headers": [(b"cookie", b"a=1; _token=xyz")]}) == "xyz"
    assert guard.credential({"headers": [(b"authorization", b"Basic Zm9v"), (b"cookie", b"_token=c")]}) == "c"
    assert guard.credential({"headers": [(b"authorization", b"Basic Zm9v")]}) is None
    assert guard.credential({"headers": []}) is None


def test_oversized_body_and_broken_policy(guard, tmp_path, monkeypatch):
    down = Downstream()
    app = guard.TriggerGuard(down)
    big = payload({"reason": "x" * (guard.MAX_BODY_BYTES + 1)})
    assert call(app, "/api/v2/dags/shoefix_urgent_update/dagRuns", big, chunk=65536)[0] == 413
    (tmp_path / "policy.yaml").write_text("gate: {min_effect: 0.1, nonsense: 1}\n")
    monkeypatch.setenv("SHOEFIX_POLICY", str(tmp_path / "policy.yaml"))
    status, body = call(app, "/api/v2/dags/shoefix_weekly_retrain/dagRuns", payload({}))
    assert status == 500 and b"no run was created" in body and down.bodies == []  # fail closed
