"""Create the pipeline's MLflow user and its experiment on a basic-auth server (idempotent).

The pipeline never runs as the MLflow admin. As its own user it creates experiment `shoefix`
without an artifact location, so the server puts artifacts under `mlflow-artifacts:/<id>` (its
proxied store, MinIO in compose) and the user owns the experiment (MANAGE) while others read.

Environment: MLFLOW_TRACKING_URI, MLFLOW_AUTH_ADMIN_USERNAME (default admin),
MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_PIPELINE_USERNAME, MLFLOW_PIPELINE_PASSWORD.
Standard library only: it runs in the MLflow image and from scripts/stack.sh alike.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

EXPERIMENT = "shoefix"


def call(base: str, method: str, path: str, user: str, password: str, body: dict | None = None) -> tuple[int, dict]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(f"{base}{path}", method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_healthy(base: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"MLflow at {base} is not healthy after {timeout_s:.0f} s") from None
            time.sleep(1)


def main() -> int:
    base = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    admin = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"), os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    user, password = os.environ["MLFLOW_PIPELINE_USERNAME"], os.environ["MLFLOW_PIPELINE_PASSWORD"]
    wait_healthy(base)
    status, body = call(base, "POST", "/api/2.0/mlflow/users/create", *admin, {"username": user, "password": password})
    if status == 400 and body.get("error_code") == "RESOURCE_ALREADY_EXISTS":  # keep it in step with the env
        status, body = call(base, "PATCH", "/api/2.0/mlflow/users/update-password", *admin,
                            {"username": user, "password": password})
    if status != 200:
        print(f"could not create/update MLflow user {user}: HTTP {status} {body}", file=sys.stderr)
        return 1
    q = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
    status, body = call(base, "GET", f"/api/2.0/mlflow/experiments/get-by-name?{q}", user, password)
    if status == 404:
        status, body = call(base, "POST", "/api/2.0/mlflow/experiments/create", user, password, {"name": EXPERIMENT})
    if status != 200:
        print(f"could not find/create experiment {EXPERIMENT}: HTTP {status} {body}", file=sys.stderr)
        return 1
    print(f"MLflow user {user} and experiment {EXPERIMENT} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
