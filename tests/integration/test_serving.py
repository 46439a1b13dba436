"""A real `shoefix serve` process over a real registry (SQLite MLflow, tiny model, real adapters):
it waits for a champion, answers through a real HTTP client (whole and streamed) and through
`shoefix ask`, reloads when `champion` moves, and refuses a tampered served artifact, keeping the
previous champion and reporting the refusal on /healthz."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, env_with
from tests.integration.conftest import http
from tests.reliability.test_registry_faults import make_adapter, register, training_run


def champion(settings, base: Path, tmp_path: Path, key: str, seed: int, tamper: bool = False) -> int:
    """Register a real adapter on `base` as a new version and make it champion (its stored adapter
    weights altered first when `tamper`: what an attacker or a broken store would leave)."""
    from shoefix_tasks.registry import versions as registry

    version = register(settings, base, training_run(settings, key, make_adapter(base, settings, tmp_path / key, seed)))
    if tamper:
        uri = registry.adapter_uri(version)
        assert uri.startswith("file://"), uri  # the test's local artifact store
        weights = Path(uri.removeprefix("file://")) / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-8] ^= 0xFF
        weights.write_bytes(bytes(data))
    registry.set_champion(settings, int(version.version), f"test {key}", "test")
    return int(version.version)


def chat(base: str, question: str, stream: bool = False, max_tokens: int = 6) -> tuple[int, str]:
    return http(f"{base}/v1/chat/completions", json_body={"model": "shoefix-expert", "stream": stream,
                                                          "messages": [{"role": "user", "content": question}],
                                                          "max_tokens": max_tokens}, timeout=120)


def streamed_text(base: str, question: str) -> tuple[str, dict]:
    """The text of a streamed answer, read line by line as it arrives, and its last chunk's `shoefix`."""
    req = urllib.request.Request(f"{base}/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": [{"role": "user", "content": question}],
                                                  "max_tokens": 6, "stream": True}).encode())
    text, last = "", {}
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = [raw.decode().strip() for raw in resp if raw.strip()]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        text += chunk["choices"][0]["delta"].get("content", "")
        last = chunk
    assert last["choices"][0]["finish_reason"] == "stop"
    return text, last["shoefix"]


def ask(settings, *args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoefix_tasks.ops.cli", "ask", *args], cwd=ROOT, timeout=300,
                          env=env_with(settings, SHOEFIX_SERVING_URL=url), capture_output=True, text=True)


@pytest.mark.slow
def test_serve_answers_reloads_and_refuses_a_tampered_champion(shoefix_env, tiny_model, shoefix_server, tmp_path):
    s, base, wait = shoefix_env, shoefix_server["base"], shoefix_server["wait"]
    q = "How do I dry wet leather boots?"

    # nothing registered: the server runs, says so, and refuses questions with 503 + Retry-After
    assert wait(lambda h: h["status"] == "no_model")["serving"] is None
    req = urllib.request.Request(f"{base}/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": [{"role": "user", "content": q}]}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    assert refused.value.code == 503 and int(refused.value.headers["Retry-After"]) >= 1
    assert json.loads(refused.value.read())["error"]["code"] == "not_serving"

    v1 = champion(s, tiny_model, tmp_path, "p1", seed=1)
    health = wait(lambda h: (h["serving"] or {}).get("version") == v1)
    # the tiny base ships no GGUF: transformers serves the verified adapter (no derived artifact to hash)
    assert health["status"] == "ok" and health["serving"]["engine"] == "transformers"
    status, body = chat(base, q)
    assert status == 200, body
    reply = json.loads(body)
    whole = reply["choices"][0]["message"]["content"]
    assert whole and reply["shoefix"]["version"] == v1
    text, info = streamed_text(base, q)
    assert text == whole and info["version"] == v1  # greedy: the stream is the same answer
    models = json.loads(http(f"{base}/v1/models")[1])
    assert models["data"][0]["id"] == "shoefix-expert" and models["data"][0]["version"] == v1

    # `shoefix ask` asks the server (streaming it to stdout)
    out = ask(s, q, "--max-new-tokens", "6", "--server-only", url=base)
    assert out.returncode == 0 and out.stdout.strip() == whole, out.stderr[-2000:]

    # the alias moves: the server loads v2 and swaps
    v2 = champion(s, tiny_model, tmp_path, "p2", seed=2)
    wait(lambda h: (h["serving"] or {}).get("version") == v2)
    assert json.loads(chat(base, q)[1])["shoefix"]["version"] == v2

    # a tampered champion is refused: v2 keeps serving, /healthz says what failed and why
    v3 = champion(s, tiny_model, tmp_path, "p3", seed=3, tamper=True)
    health = wait(lambda h: (h["load_error"] or {}).get("version") == v3)
    assert health["status"] == "degraded" and health["serving"]["version"] == v2 and health["champion_alias"] == v3
    assert "Integrity" in health["load_error"]["error"] or "hash" in health["load_error"]["error"].lower()
    status, body = chat(base, q)
    assert status == 200 and json.loads(body)["shoefix"]["version"] == v2
    assert "failed to load" in shoefix_server["log"].read_text()

    # no server: `shoefix ask --server-only` names the command that starts one
    shoefix_server["stop"]()
    out = ask(s, q, "--server-only", url=base)
    assert out.returncode == 1 and "shoefix serve" in out.stderr and "Traceback" not in out.stderr
