"""The full stack, natively: `scripts/stack.sh start` (Postgres, Redis, MLflow with basic-auth,
Airflow with the CeleryExecutor and FAB auth, one Celery worker on `default,gpu`), once for the
tests of this folder (one xdist work unit, tests/conftest.py), stopped after the last of them (not
at the end of the session: an idle stack still takes CPU from the tests after it). Logs stay under
the state folder; a failing test prints their tails.

Test-only settings (exported before the start, so every service inherits them):
- `[scheduler] use_job_schedule = False`: no cron run of the weekly DAG sneaks in with the real
  recipe; manual triggers (CLI, REST) still run.
- short heartbeat / orphan / refresh intervals, so a killed scheduler's tasks are adopted and a
  lost task is detected in seconds, not the default 5 minutes.
- `SHOEFIX_POLICY`: the test-only lenient gate (tests/fixtures/policy/lenient.yaml) with the tiny
  recipe's folder as a recipe folder, written before the start so every service (api-server, DAG
  processor, workers) reads it, and triggers name the recipe `tiny`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, ROOT, build_tiny_model, write_policy, write_tiny_recipe

STACK = ROOT / "scripts" / "stack.sh"
TEST_SETTINGS = {
    "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "120",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "15",
    # one intra-op thread for the trainer: the other xdist worker shares the two cores (tests/conftest.py)
    "SHOEFIX_TORCH_THREADS": "1",
}
TERMINAL = {"success", "failed"}


@dataclass
class Stack:
    state: Path
    env: dict[str, str]
    _token: str | None = field(default=None, repr=False)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.env['API_PORT']}"

    @property
    def mlflow(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def secrets(self) -> dict[str, str]:
        lines = (self.state / "secrets.env").read_text().splitlines()
        return dict(ln.split("=", 1) for ln in lines if "=" in ln)

    def token(self) -> str:
        """A JWT from the api-server's /auth/token (FAB auth manager), as a REST client gets one."""
        import requests

        if self._token is None:
            s = self.secrets
            resp = requests.post(f"{self.api}/auth/token", timeout=60,
                                 json={"username": s["AIRFLOW_ADMIN_USERNAME"], "password": s["AIRFLOW_ADMIN_PASSWORD"]})
            assert resp.status_code in (200, 201), resp.text
            self._token = resp.json()["access_token"]
        return self._token

    def rest(self, method: str, path: str, json: dict | None = None, auth: bool = True):
        import requests

        headers = {"Authorization": f"Bearer {self.token()}"} if auth else {}
        return requests.request(method, f"{self.api}/api/v2{path}", json=json, headers=headers, timeout=120)

    def airflow(self, *args: str, timeout: int = 300) -> str:
        proc = subprocess.run(["airflow", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc.stdout

    def script(self, *args: str, extra_env: dict[str, str] | None = None, timeout: int = 600) -> None:
        proc = subprocess.run(["bash", str(STACK), *args, str(self.state)], env={**self.env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def wait_for_dag(self, dag_id: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while self.rest("GET", f"/dags/{dag_id}").status_code != 200:
            assert time.monotonic() < deadline, f"{dag_id} was not parsed within {timeout_s} s"
            time.sleep(1)

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        resp = self.rest("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        assert resp.status_code == 200, resp.text
        return {ti["task_id"]: ti for ti in resp.json()["task_instances"]}

    def run_state(self, dag_id: str, run_id: str) -> str:
        resp = self.rest("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()["state"]

    def wait_until(self, predicate, what: str, timeout_s: float, every_s: float = 2.0):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = predicate()
            except Exception:  # noqa: BLE001 - a service restarting mid-poll answers with errors for a while
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
            time.sleep(every_s)

    def wait_run(self, dag_id: str, run_id: str, timeout_s: float = 900) -> str:
        return self.wait_until(lambda: (st := self.run_state(dag_id, run_id)) in TERMINAL and st,
                               f"{dag_id} {run_id} to finish", timeout_s)

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for path in sorted((self.state / "logs").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"===== {path.name} =====\n" + "\n".join(text))
        for path in sorted(glob.glob(f"{self.state}/airflow/logs/dag_id=*/**/*.log", recursive=True))[-6:]:
            text = Path(path).read_text(errors="replace").splitlines()[-lines:]
            out.append(f"===== {path} =====\n" + "\n".join(text))
        return "\n".join(out)


def _stack_env(state: Path) -> dict[str, str]:
    """stack.env as a dict: what the services run with, for the test's own CLI calls."""
    proc = subprocess.run(["bash", "-c", f"set -a; source {state}/stack.env; env -0"], capture_output=True,
                          check=True, env={"PATH": os.environ["PATH"]})
    env = dict(item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)
    return {**env, **TEST_SETTINGS}


_STARTED: list[Stack] = []


@pytest.fixture(scope="package")
def stack() -> Stack:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.skip("Debian's postgresql package is not installed (apt-get install postgresql)")
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    # not pytest's tmp dir: its parents are private to root, and Postgres runs as `postgres`
    state = Path(tempfile.mkdtemp(prefix="shoefix-stack-"))
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "SHOEFIX_", "MLFLOW_"))}
    # the recipe exists before the DAG processor first parses the DAGs (their `recipe` Param's enum)
    model = build_tiny_model(state / "models" / "tiny-llama")
    write_tiny_recipe(state / "recipes", model, num_train_epochs=1)
    policy = write_policy(state / "policy.yaml", [state / "recipes"])
    env = {**base, **TEST_SETTINGS, "SHOEFIX_HOME": str(state / "shoefix"),
           "SHOEFIX_DATA_DIR": str(FIXTURES / "data"), "SHOEFIX_POLICY": str(policy)}
    started = time.monotonic()
    proc = subprocess.run(["bash", str(STACK), "start", str(state)], env=env, capture_output=True, text=True,
                          timeout=900)
    s = Stack(state, _stack_env(state) if (state / "stack.env").exists() else env)
    _STARTED.append(s)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr + "\n" + s.log_tails()
        print(f"\nstack up in {time.monotonic() - started:.0f} s: {s.api}, MLflow {s.mlflow}")
        (state / "shoefix" / "inbox").mkdir(parents=True, exist_ok=True)
        yield s
    finally:
        subprocess.run(["bash", str(STACK), "stop", str(state)], env=env, capture_output=True, timeout=300)
        _STARTED.remove(s)
        if not os.environ.get("SHOEFIX_KEEP_STACK"):
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="package")
def stack_recipe(stack) -> str:
    """The name of the tiny random model's recipe (in the test policy's recipe folder, whose lenient
    gate promotes any non-tied challenger, so a champion exists). Triggers name it, never a path."""
    assert (stack.state / "recipes" / "tiny.yaml").is_file()
    assert stack.env.get("SHOEFIX_POLICY") == str(stack.state / "policy.yaml")
    return "tiny"


def inbox_file(stack: Stack, fixture: str, name: str) -> Path:
    target = stack.state / "shoefix" / "inbox" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURES / fixture, target)
    return target


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and _STARTED:
        report.sections.append(("full-stack logs (tails)", _STARTED[-1].log_tails()))
    return report
