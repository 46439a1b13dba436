"""Issue 7, scenarios 4-7: the registry under faults, against a real `mlflow server` over HTTP.

A small fault-injecting HTTP proxy (`FaultProxy`) sits between the client and the server: it can
answer 503, accept an upload and drop it (a store that silently loses a file), or kill the server
mid-upload. Processes that must die at a precise point run as real subprocesses and `os._exit`.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import ROOT, env_with

MODEL = "shoefix-expert"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- real adapters, fast: a PEFT LoRA on the tiny model with seeded random weights -----------------

def make_adapter(base: Path, settings, out: Path, seed: int) -> Path:
    """A real PEFT adapter (safetensors + manifest with the base identity), untrained but non-zero,
    so it changes the model's answers. Seconds instead of a training run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shoefix_tasks.model.adapter import write_manifest
    from shoefix_tasks.model.base import base_identity

    out = out / "adapter"  # the trainer's folder name: the logged model stores it under this name
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    write_manifest(out, base_identity(str(base), settings), {"recipe": "test", "snapshot_hash": f"seed{seed}"})
    return out


def training_run(settings, key: str, adapter: Path) -> dict:
    """What the trainer returns for `adapter`: a `train` MLflow run holding it."""
    import mlflow

    from shoefix_tasks.store import tracking
    tracking.configure(settings)
    run_id = tracking.run_for("train", key, run_name="train")
    mlflow.MlflowClient().log_artifacts(run_id, str(adapter), "adapter")
    return {"run_id": run_id, "adapter_dir": str(adapter), "snapshot_hash": f"snap-{key}"}


def register(settings, base: Path, train: dict):
    from shoefix_tasks.registry import versions as registry
    return registry.register_version(train["run_id"], Path(train["adapter_dir"]), str(base),
                                     {"pipeline_run": "test"}, "test version", {"max_new_tokens": 4},
                                     settings=settings)


def versions_of(client, run_id: str | None = None) -> list[int]:
    query = f"name='{MODEL}'" + (f" and run_id='{run_id}'" if run_id else "")
    return sorted(int(v.version) for v in client.search_model_versions(query))


# --- the MLflow server and the fault proxy ---------------------------------------------------------

class FaultProxy:
    """Forwards HTTP to the MLflow server; `rules` ((method, path regex, action, times)) inject faults.

    Actions: an int = answer that status; "lose" = answer 200 but never forward (the store lost the
    upload); "kill" = SIGKILL the server, then drop the connection.
    """

    def __init__(self, server: MlflowServer):
        self.server = server
        self.rules: list[list] = []
        self.seen: list[tuple[str, str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = proxy.match(self.command, self.path)
                proxy.seen.append((self.command, self.path, str(action)))
                if action == "kill":
                    proxy.server.kill()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(action, int) or action == "lose":
                    code = 200 if action == "lose" else action
                    payload = b"{}" if code == 200 else b'{"error_code": "TEMPORARILY_UNAVAILABLE"}'
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.server.port, timeout=120)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    headers["Host"] = f"127.0.0.1:{proxy.server.port}"
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:  # the server is down: what a client sees from a dead load balancer
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def match(self, method: str, path: str):
        for rule in self.rules:
            m, pattern, action, times = rule
            if m == method and re.search(pattern, path) and times != 0:
                rule[3] = times - 1
                return action
        return None

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p, _ in self.seen if m == method and re.search(pattern, p))

    def close(self):
        self.httpd.shutdown()


class MlflowServer:
    """`mlflow server` over HTTP with proxied artifact storage (--serve-artifacts), restartable."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self):
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
               "--serve-artifacts", "--artifacts-destination", str(self.folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        log = open(self.folder / "server.log", "ab")
        # no server-side job runner (as mlflow/serve.sh): ShoeFix submits no MLflow jobs
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, cwd=self.folder, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its workers
            self.proc.wait()


@pytest.fixture(scope="module")
def mlflow_http(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    proxy = FaultProxy(server)
    yield proxy
    proxy.close()
    server.kill()


@pytest.fixture()
def http_env(shoefix_env, mlflow_http, monkeypatch):
    """Settings pointing at the proxied server; a clean registry; client retries kept short."""
    import dataclasses

    import mlflow

    if mlflow_http.server.proc.poll() is not None:
        mlflow_http.server.start()
    mlflow_http.rules.clear()
    uri = f"http://127.0.0.1:{mlflow_http.port}"
    for k, v in {"MLFLOW_TRACKING_URI": uri, "SHOEFIX_ARTIFACT_ROOT": "mlflow-artifacts:/shoefix",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.1", "SHOEFIX_PROMOTION_LEASE_S": "3"}.items():
        monkeypatch.setenv(k, v)
    settings = dataclasses.replace(shoefix_env, tracking_uri=uri, artifact_root="mlflow-artifacts:/shoefix")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    try:
        client.delete_registered_model(MODEL)
    except mlflow.exceptions.MlflowException:
        pass
    return settings


def direct_client(proxy):
    """A client that bypasses the proxy: what the server really holds."""
    import mlflow

    url = f"http://127.0.0.1:{proxy.server.port}"
    return mlflow.MlflowClient(tracking_uri=url, registry_uri=url)


def champion_of(client) -> int | None:
    import mlflow

    try:
        return int(client.get_model_version_by_alias(MODEL, "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


WEIGHTS = r"/mlflow-artifacts/artifacts/.*/models/m-[^/]+/artifacts/artifacts/adapter/adapter_model\.safetensors"


# --- scenario 4 ------------------------------------------------------------------------------------

@pytest.mark.integration
def test_upload_faults_are_retried_and_never_register_a_partial_adapter(http_env, mlflow_http, tiny_model,
                                                                        tmp_path):
    from shoefix_tasks.model.adapter import AdapterIntegrityError

    s, proxy = http_env, mlflow_http
    train = training_run(s, "upload", make_adapter(tiny_model, s, tmp_path / "a", seed=1))
    direct = direct_client(proxy)

    # (a) the store answers 503 twice to the weights upload: the client retries, one version results
    proxy.rules.append(["PUT", WEIGHTS, 503, 2])
    version = register(s, tiny_model, train)
    assert proxy.count("PUT", WEIGHTS) == 3  # two refusals, then the retry that landed
    assert versions_of(direct) == [int(version.version)] == [1]

    # (b) the store acknowledges the weights but loses them: the read-back check refuses, no version
    direct.delete_registered_model(MODEL)
    proxy.rules.append(["PUT", WEIGHTS, "lose", 1])
    with pytest.raises(AdapterIntegrityError):
        register(s, tiny_model, train)
    assert versions_of(direct) == []

    # (c) the server dies in the middle of the upload: the client's retries run out, the task fails
    proxy.rules.append(["PUT", WEIGHTS, "kill", 1])
    t0 = time.time()
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises once the server is gone
        register(s, tiny_model, train)
    assert time.time() - t0 < 60  # bounded retries, not a hang
    proxy.server.start()  # the server comes back (same store)
    assert versions_of(direct) == []  # no version points at the partial upload
    # ... and the task's retry registers exactly one version, whose adapter verifies
    version = register(s, tiny_model, train)
    assert versions_of(direct) == [int(version.version)]
    from shoefix_tasks.registry import versions as registry
    assert (registry.download_adapter(version, s) / "adapter_model.safetensors").is_file()


# --- scenario 5 ------------------------------------------------------------------------------------

@pytest.mark.integration
def test_mlflow_down_during_promotion_keeps_the_champion_until_read_back(http_env, mlflow_http, tiny_model,
                                                                          tmp_path):
    from shoefix_tasks.registry import versions as registry
    s, proxy = http_env, mlflow_http
    direct = direct_client(proxy)
    v1 = register(s, tiny_model, training_run(s, "p1", make_adapter(tiny_model, s, tmp_path / "a", seed=1)))
    with registry.promotion_lock(s, "test") as lease:
        registry.set_champion(s, int(v1.version), "first", "test", lease=lease)
    v2 = register(s, tiny_model, training_run(s, "p2", make_adapter(tiny_model, s, tmp_path / "b", seed=2)))

    def promote_v2():
        with registry.promotion_lock(s, "gate") as lease:
            return registry.set_champion(s, int(v2.version), "better", "gate", lease=lease)

    # the registry is down for the alias write: the task fails; champion and history unchanged
    proxy.rules.append(["POST", r"registered-models/alias", 503, -1])
    with pytest.raises(Exception):  # noqa: B017 - MLflow's error after its retries
        promote_v2()
    assert champion_of(direct) == 1
    assert [h["version"] for h in registry.champion_history(s)] == [1]

    # the alias write lands but the read-back fails: not recorded as promoted
    proxy.rules[:] = [["GET", r"registered-models/alias", 503, -1]]
    with pytest.raises(Exception):  # noqa: B017
        promote_v2()
    assert [h["version"] for h in registry.champion_history(s)] == [1]

    # MLflow is back: the retry reads the alias back and records the change exactly once
    proxy.rules.clear()
    assert promote_v2() == 1
    assert champion_of(direct) == 2
    history = registry.champion_history(s)
    assert [(h["version"], h["previous_version"]) for h in history] == [(1, None), (2, 1)]


# --- scenarios 6 and 7: processes that die at a precise point --------------------------------------

DIE_AFTER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.config import Settings
    import mlflow
    s = Settings.from_env()
    point, arg = sys.argv[1], sys.argv[2]
    if point == "alias":      # the alias moved, the history row was never written
        registry._record_history = lambda *a, **k: os._exit(9)
        with registry.promotion_lock(s, "doomed") as lease:
            registry.set_champion(s, int(arg), "doomed promotion", "gate", lease=lease)
    else:                     # the version exists, the task never reported it
        create = mlflow.MlflowClient.create_model_version
        def create_then_die(self, *a, **k):
            create(self, *a, **k)
            os._exit(9)
        mlflow.MlflowClient.create_model_version = create_then_die
        from shoefix_tasks.store import tracking
        tracking.configure(s)
        run_id, adapter, base = arg.split(",")
        registry.register_version(run_id, Path(adapter), base, {}, "doomed", settings=s)
    raise SystemExit("survived")
""")


def die_at(settings, point: str, arg: str) -> None:
    out = subprocess.run([sys.executable, "-c", DIE_AFTER, point, arg], env=env_with(settings), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 9, out.stderr[-3000:]


@pytest.mark.integration
def test_crash_after_alias_set_retry_only_completes_the_audit(http_env, mlflow_http, tiny_model, tmp_path):
    from shoefix_tasks.registry import versions as registry
    s, proxy = http_env, mlflow_http
    direct = direct_client(proxy)
    v1 = register(s, tiny_model, training_run(s, "c1", make_adapter(tiny_model, s, tmp_path / "a", seed=1)))
    with registry.promotion_lock(s, "test") as lease:
        registry.set_champion(s, 1, "first", "test", lease=lease)
    v2 = register(s, tiny_model, training_run(s, "c2", make_adapter(tiny_model, s, tmp_path / "b", seed=2)))
    die_at(s, "alias", v2.version)
    assert champion_of(direct) == 2 and [h["version"] for h in registry.champion_history(s)] == [1]
    assert registry.promotion_lock(s, "probe").holder_now() is not None  # the dead holder's lease remains

    t0 = time.time()
    with registry.promotion_lock(s, "gate-retry") as lease:  # waits out the dead holder's 3 s lease
        waited = lease.waited_s
        previous = registry.set_champion(s, 2, "retry", "gate", lease=lease)
    assert 0 < waited <= 3 + 2 and time.time() - t0 < 30
    assert previous == 1
    history = registry.champion_history(s)
    assert [(h["version"], h["previous_version"]) for h in history] == [(1, None), (2, 1)]
    assert versions_of(direct) == [int(v1.version), int(v2.version)]
    with registry.promotion_lock(s, "gate-retry-2") as lease:  # a second retry changes nothing
        registry.set_champion(s, 2, "retry", "gate", lease=lease)
    assert len(registry.champion_history(s)) == 2


@pytest.mark.integration
def test_killed_after_version_created_retry_reuses_it_even_when_racing(http_env, mlflow_http, tiny_model,
                                                                        tmp_path):
    s, proxy = http_env, mlflow_http
    direct = direct_client(proxy)
    train = training_run(s, "k1", make_adapter(tiny_model, s, tmp_path / "a", seed=1))
    die_at(s, "version", f"{train['run_id']},{train['adapter_dir']},{tiny_model}")
    assert versions_of(direct, train["run_id"]) == [1]  # created, never reported
    version = register(s, tiny_model, train)  # the retry
    assert int(version.version) == 1 and versions_of(direct) == [1]

    # two retries of one run racing to create the version (no lock held): still one version
    train2 = training_run(s, "k2", make_adapter(tiny_model, s, tmp_path / "b", seed=2))
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from shoefix_tasks.registry import versions as registry
        from shoefix_tasks.store import tracking
        from shoefix_tasks.config import Settings
        s = Settings.from_env(); tracking.configure(s)
        run_id, adapter, base, go, ready = sys.argv[1:]
        (Path(ready) / str(os.getpid())).touch()  # imported and waiting
        while not Path(go).exists():
            time.sleep(0.05)
        print("VERSION", registry.register_version(run_id, Path(adapter), base, {}, "race", settings=s).version)
    """)
    go, ready = tmp_path / "go", tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, train2["run_id"], train2["adapter_dir"], str(tiny_model),
                               str(go), str(ready)], env=env_with(s), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 300
    while len(list(ready.iterdir())) < 2:  # both imported and waiting (was a fixed 8 s sleep)
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        assert time.time() < deadline, "the racing processes never got ready"
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    reported = {int(o.split("VERSION")[1]) for o, _ in outs}
    assert versions_of(direct, train2["run_id"]) == sorted(reported) and len(reported) == 1
