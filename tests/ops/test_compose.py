"""The full-stack compose file: it renders with real secrets and refuses to without them.

`docker compose config` (v2 plugin) or `docker-compose config` (v1, Debian's package) interpolates
and validates the file without a Docker engine. The secret check that every service waits for,
and MLflow's launch script, are run for real against weak and strong values.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
GOOD_ENV = {
    "POSTGRES_PASSWORD": "pg-9f3b2c71d04e8a65",
    "REDIS_PASSWORD": "rd-51c0a7e94b2f8d36",
    "MINIO_ROOT_USER": "shoefix-artifacts",
    "MINIO_ROOT_PASSWORD": "mn-0d8e4f17a92c6b53",
    "AIRFLOW_ADMIN_USERNAME": "ops",
    "AIRFLOW_ADMIN_PASSWORD": "af-7a2e91c5b0d43f68",
    "AIRFLOW_FERNET_KEY": "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg=",
    "AIRFLOW_API_SECRET_KEY": "sk-3c6f0a9d85e1b274",
    "AIRFLOW_JWT_SECRET": "jw-e4b17d2a6c90f385",
    "MLFLOW_AUTH_ADMIN_USERNAME": "mlflow-admin",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "ml-28d5f0c3a7e19b46",
    "MLFLOW_PIPELINE_USERNAME": "shoefix-pipeline",
    "MLFLOW_PIPELINE_PASSWORD": "pp-b93a4e07c1d65f28",
    "MLFLOW_SECRET_KEY": "fk-61e0b8d2c47a93f5",
}


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")
    # only PATH plus the given values: nothing leaks in from the caller's environment or a .env
    return subprocess.run([*cmd, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT / "docker"),
                           "config"], env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True,
                          cwd="/", timeout=60)


@pytest.fixture(scope="module")
def rendered() -> dict:
    proc = compose_config(GOOD_ENV)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_renders_every_service_of_the_topology(rendered):
    services = rendered["services"]
    assert {"postgres", "redis", "minio", "mlflow", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu",
            "check-secrets"} <= set(services)
    for name in ("postgres", "redis", "minio", "mlflow", "airflow-apiserver", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_celery_queues_and_gpu_reservation(rendered):
    services = rendered["services"]
    cpu, gpu = services["airflow-worker"]["command"], services["airflow-worker-gpu"]["command"]
    assert cpu[cpu.index("--queues") + 1] == "default"
    assert gpu[gpu.index("--queues") + 1] == "gpu"
    devices = services["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in services["airflow-worker"]  # CPU tasks never hold a GPU
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["SHOEFIX_TRAIN_DISPATCH"] == "celery"
    assert env["AIRFLOW__CELERY__BROKER_URL"] == f"redis://:{GOOD_ENV['REDIS_PASSWORD']}@redis:6379/0"


def test_the_answer_server_is_a_service_on_loopback_and_the_page_forwards_to_it(rendered):
    services = rendered["services"]
    serve = services["shoefix-serve"]
    assert serve["command"] == ["shoefix", "serve"] and serve["healthcheck"]["test"]
    assert [p if isinstance(p, str) else f"{p['host_ip']}:{p['published']}:{p['target']}" for p in serve["ports"]] \
        in (["127.0.0.1:8765:8765/tcp"], ["127.0.0.1:8765:8765"])  # no auth of its own: never on every interface
    assert serve["environment"]["SHOEFIX_SERVE_PORT"] == "8765"
    assert services["airflow-apiserver"]["environment"]["SHOEFIX_SERVING_URL"] == "http://shoefix-serve:8765"


def test_every_service_waits_for_the_secret_check(rendered):
    services = rendered["services"]
    for name, svc in services.items():
        if name == "check-secrets":
            continue
        deps = svc.get("depends_on", {})
        chain, seen = set(deps), set()
        while chain:  # follow depends_on transitively
            dep = chain.pop()
            seen.add(dep)
            chain |= set(services[dep].get("depends_on", {})) - seen
        assert "check-secrets" in seen, f"{name} can start before the secrets are checked"


def test_secrets_come_only_from_the_environment():
    text = "\n".join(ln.split("#", 1)[0] for ln in COMPOSE_FILE.read_text().splitlines())  # not comments
    for value in GOOD_ENV.values():
        assert value not in text
    for default in ("minioadmin", "password1234", "airflow:airflow", "POSTGRES_PASSWORD: airflow"):
        assert default not in text
    example = (ROOT / "docker" / ".env.example").read_text()
    keys = {ln.split("=", 1)[0] for ln in example.splitlines() if "=" in ln and not ln.startswith("#")}
    assert set(GOOD_ENV) <= keys
    assert all(ln.endswith("=") for ln in example.splitlines() if "=" in ln and not ln.startswith("#"))


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "AIRFLOW_JWT_SECRET",
                                     "MINIO_ROOT_PASSWORD", "REDIS_PASSWORD"])
def test_refuses_to_render_without_a_credential(missing):
    env = {k: v for k, v in GOOD_ENV.items() if k != missing}
    proc = compose_config(env)
    assert proc.returncode != 0
    assert missing in proc.stderr
    proc = compose_config({**env, missing: ""})  # empty counts as missing
    assert proc.returncode != 0


def _check_secrets(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ROOT / "docker" / "check-secrets.sh")], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("var,value", [("MINIO_ROOT_PASSWORD", "minioadmin"), ("AIRFLOW_ADMIN_PASSWORD", "admin"),
                                       ("POSTGRES_PASSWORD", "airflow"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password1234"),
                                       ("REDIS_PASSWORD", "Password"), ("AIRFLOW_JWT_SECRET", "short-1"),
                                       ("MINIO_ROOT_USER", "minioadmin"), ("AIRFLOW_FERNET_KEY", "not-a-key")])
def test_secret_check_rejects_defaults(var, value):
    assert _check_secrets(GOOD_ENV).returncode == 0
    proc = _check_secrets({**GOOD_ENV, var: value})
    assert proc.returncode != 0 and var in proc.stderr


@pytest.mark.parametrize("password", ["password1234", "short-pw"])
def test_mlflow_serve_refuses_default_admin_password(password, tmp_path):
    env = {"PATH": os.environ["PATH"], "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/m.db",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "a"), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "fk-61e0b8d2c47a93f5"}
    proc = subprocess.run(["bash", str(ROOT / "mlflow" / "serve.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1 and "refusing to start" in proc.stderr
    assert not (tmp_path / "m.db").exists()  # the server never started
