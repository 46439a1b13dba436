"""The registry as people use it: load the champion, serve it over HTTP, refuse a tampered
adapter, roll back with a reason, and keep the champion history."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from shoefix_tasks import pipeline
from shoefix_tasks.model.adapter import AdapterIntegrityError
from shoefix_tasks.registry import versions as registry
from shoefix_tasks.store import tracking
from tests.conftest import FIXTURES, ROOT, env_with


def run_pipeline(settings, recipe: str, key: str) -> dict:
    batch = pipeline.collect_qa(key, settings)
    assert batch["collected"]
    validated = pipeline.validate_qa(key, 1.0, settings)
    trained = pipeline.train_adapter(key, recipe, validated["snapshot_path"], settings=settings)
    evaluated = pipeline.evaluate_adapter(key, recipe, trained, settings=settings)
    return pipeline.gate_and_promote(key, recipe, trained, evaluated, actor="test", settings=settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_registry_serve_tamper_rollback(shoefix_env, lenient_policy, tmp_path):
    import mlflow

    s = shoefix_env
    recipe = "tiny"  # in the test policy's recipe folder; its lenient gate promotes the first challenger

    shutil.copyfile(FIXTURES / "corpus_small.jsonl", s.home / "inbox" / "a.jsonl")
    first = run_pipeline(s, recipe, "run-1")
    assert first["version"] == 1 and first["champion"] == 1
    assert run_pipeline(s, recipe, "run-1")["version"] == 1  # a retried gate never makes a second version

    rows = [json.loads(x) for x in (FIXTURES / "corpus_small.jsonl").read_text().splitlines()]
    with open(s.home / "inbox" / "b.jsonl", "w") as fh:
        for r in rows[:5]:
            fh.write(json.dumps({**r, "id": r["id"] + "-b", "question": "Again: " + r["question"]}) + "\n")
    second = run_pipeline(s, recipe, "run-2")
    assert second["version"] == 2
    tracking.configure(s)
    assert registry.version_by_alias("challenger").tags["challenged"] == "v1"
    if second["champion"] != 2:  # the tiny model can tie with v1 (ties keep the champion): promote by hand
        registry.set_champion(s, 2, "operator promotion", "test")

    # the champion answers through the registry URI, loaded from code (no pickle)
    model = mlflow.pyfunc.load_model("models:/shoefix-expert@champion")
    answers = model.predict(["How do I dry wet leather boots?"], params={"max_new_tokens": 8})
    assert len(answers) == 1 and isinstance(answers[0], str)

    ask = subprocess.run([sys.executable, "-m", "shoefix_tasks.ops.cli", "ask", "Is bleach safe on leather?",
                          "--max-new-tokens", "6"], env=env_with(s), capture_output=True, text=True, cwd=ROOT)
    assert ask.returncode == 0, ask.stderr[-2000:]

    # ... and over HTTP with `mlflow models serve`
    port = free_port()
    env = env_with(s)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/shoefix-expert@champion",
                             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = json.dumps({"inputs": ["Why do my sneakers smell?"], "params": {"max_new_tokens": 8}}).encode()
        deadline, reply = time.time() + 240, None
        while time.time() < deadline and reply is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
            except OSError:
                assert proc.poll() is None, "mlflow models serve exited"
                time.sleep(2)
        assert reply is not None and len(reply["predictions"]) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # one flipped byte in a cached adapter: refused, champion unchanged
    cached = registry.download_adapter(registry.version_by_alias("champion"), s)
    weights = cached / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(AdapterIntegrityError):
        registry.download_adapter(registry.version_by_alias("champion"), s)
    assert int(registry.version_by_alias("champion").version) == 2

    # rollback is one command, with a reason; the history keeps every change
    out = subprocess.run([sys.executable, "-m", "shoefix_tasks.ops.cli", "rollback", "--to", "1", "--reason",
                          "v2 regressed on drying advice"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(registry.version_by_alias("champion").version) == 1
    history = registry.champion_history(s)
    assert [(h["version"], h["action"]) for h in history] == [(1, "promote"), (2, "promote"), (1, "rollback")]
    assert history[-1]["reason"] == "v2 regressed on drying advice" and history[-1]["previous_version"] == 2
