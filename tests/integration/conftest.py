"""Integration fixtures shared by several files: a real `airflow api-server` over the test's state."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.conftest import ROOT, env_with, fresh_airflow_home


def http(url: str, token: str | None = None, form: dict | None = None, timeout: float = 600,
         json_body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    """(status, body) of a GET, a form POST (`form`) or a JSON POST (`json_body`)."""
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if json_body is not None:
        data = json.dumps(json_body).encode()  # allow_nan: a NaN reaches the server as the literal NaN
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def api_server(shoefix_env, tmp_path, airflow_db_template):
    """A real `airflow api-server` (SimpleAuthManager, one user with a password) over the test's state,
    on a copy of the session's migrated metadata DB."""
    home = fresh_airflow_home(tmp_path / "airflow", airflow_db_template)
    password = base64.urlsafe_b64encode(os.urandom(12)).decode()
    (home / "passwords.json").write_text(json.dumps({"shoefix": password}))
    port = free_port()
    env = env_with(shoefix_env, AIRFLOW_HOME=home, AIRFLOW__CORE__DAGS_FOLDER=ROOT / "dags",
                   AIRFLOW__CORE__PLUGINS_FOLDER=ROOT / "plugins", AIRFLOW__CORE__LOAD_EXAMPLES="False",
                   AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
                   AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="shoefix:admin",
                   AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="False",
                   AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=home / "passwords.json",
                   AIRFLOW__API__WORKERS=1, AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}")
    log = open(tmp_path / "api-server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["airflow", "api-server", "-p", str(port), "-H", "127.0.0.1"], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if http(f"{base}/api/v2/monitor/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "api-server.log").read_text()[-3000:]
            assert time.time() < deadline, "api-server did not come up"
            time.sleep(1)
        req = urllib.request.Request(f"{base}/auth/token", json.dumps({"username": "shoefix", "password": password})
                                     .encode(), headers={"Content-Type": "application/json"})
        token = json.loads(urllib.request.urlopen(req, timeout=30).read())["access_token"]
        yield {"base": base, "token": token, "log": tmp_path / "api-server.log", "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def wait_health(base: str, until, timeout: float = 240, proc=None, log=None) -> dict:
    """GET {base}/healthz until `until(health)` holds; returns that health."""
    deadline, health = time.time() + timeout, None
    while time.time() < deadline:
        try:
            status, body = http(f"{base}/healthz", timeout=10)
            health = json.loads(body)
            if until(health):
                return health
        except (OSError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"shoefix serve exited {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)
    raise AssertionError(f"health never became what was waited for; last: {health}")


@pytest.fixture()
def shoefix_server(shoefix_env, tmp_path, monkeypatch):
    """A real `shoefix serve` process over the test's state (champion polled every second, a queue of
    4, answers sent to MLflow as traces every second), and SHOEFIX_SERVING_URL pointing at it for clients started after it (an `api_server` fixture
    listed after this one passes it to the api-server). `stop()` ends it early. The MLflow store is
    made first: two processes creating one SQLite store at once collide in its migrations."""
    from shoefix_tasks.store import tracking

    tracking.configure(shoefix_env)
    port = free_port()
    log_path = tmp_path / "shoefix-serve.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    env = env_with(shoefix_env, SHOEFIX_SERVE_POLL_S=1, SHOEFIX_SERVE_QUEUE=4, SHOEFIX_SERVE_PORT=port,
                   SHOEFIX_TRACE_FLUSH_S=1)
    proc = subprocess.Popen([sys.executable, "-m", "shoefix_tasks.ops.cli", "serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("SHOEFIX_SERVING_URL", base)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    try:
        wait_health(base, lambda h: "status" in h, 120, proc, log_path)
        yield {"base": base, "log": log_path, "proc": proc, "stop": stop,
               "wait": lambda until, timeout=240: wait_health(base, until, timeout, proc, log_path)}
    finally:
        stop()
        log.close()
