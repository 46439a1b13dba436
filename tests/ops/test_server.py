"""`shoefix serve` in this process over a real engine (the tiny model through transformers): the
OpenAI-compatible endpoint through a real HTTP client, streamed and not; the safety net on streams;
a full queue answers 503 with Retry-After under 16 concurrent requests, and the server lives on; and
over the real default base through llama.cpp, a tampered served GGUF is refused while the old champion
keeps serving.

The registry side (reload when `champion` moves, a tampered artifact refused) is in
tests/integration/test_serving.py, against a real `shoefix serve` process.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from shoefix_tasks.config import ServeConfig
from shoefix_tasks.registry.safety import check_answer, checked_stream
from tests.conftest import DATA

FORBIDDEN = "Yes. Mixing bleach and vinegar is safe and makes a stronger cleaner."
QUESTION = "My rain boots are moldy. Can I mix bleach and vinegar for a stronger cleaner?"


def pieces_of(text: str, size: int = 3):
    """`text` in pieces of `size` characters, as a generator that records being closed."""
    state = {"closed": False, "sent": 0}

    def gen():
        try:
            for i in range(0, len(text), size):
                state["sent"] += 1
                yield text[i:i + size]
        finally:
            state["closed"] = True
    return gen(), state


def test_a_stream_stops_before_a_forbidden_claim_and_sends_the_guidance(tmp_path):
    safe = "Dry the boots at room temperature, stuffed with newspaper. "
    answer = safe + FORBIDDEN + " Then scrub the seams well."
    pieces, state = pieces_of(answer)
    out = list(checked_stream(QUESTION, pieces, DATA, tmp_path, model="v1"))
    shown = "".join(out)
    whole = check_answer(QUESTION, FORBIDDEN, DATA)
    assert whole.replaced  # the sentence is one check_answer refuses on its own
    assert out[0] == "Dry the boots at room temperature, stuffed with newspaper."  # a whole sentence at a time
    assert "is safe" not in shown and "stronger cleaner" not in shown.split("\n\n")[0]
    assert shown.endswith(whole.answer) and "Never mix bleach" in shown  # the claim's guidance replaces it
    assert state["closed"] and state["sent"] < len(answer) / 3  # the model's generator stopped early
    assert (tmp_path / "safety" / "replaced.jsonl").is_file()  # logged like a replaced whole answer


def test_a_safe_stream_is_the_answer_unchanged_sentence_by_sentence(tmp_path):
    answer = "Never mix bleach with vinegar: it releases chlorine gas. Let them air-dry for 1.5 days.\nUse 70% alcohol"
    pieces, state = pieces_of("\n " + answer + " \n", 2)  # the ends' whitespace goes, as from a whole answer
    out = list(checked_stream(QUESTION, pieces, DATA, tmp_path))
    assert "".join(out) == answer and not check_answer(QUESTION, answer, DATA).replaced
    assert out == ["Never mix bleach with vinegar: it releases chlorine gas.", " Let them air-dry for 1.5 days.",
                   "\nUse 70% alcohol"]  # "1.5" is no sentence end; the unterminated tail comes last
    assert state["closed"] and not (tmp_path / "safety").exists()


def test_a_chinese_stream_is_checked_at_each_full_stop(tmp_path):
    safe, bad = "請先把鞋子放在通風處陰乾。", "口服類固醇可以幫助控制血糖。"
    pieces, state = pieces_of(safe + bad + "之後再清潔。", 2)
    out = list(checked_stream("我有糖尿病，可以吃類固醇讓腳好起來嗎？", pieces, DATA, tmp_path))
    assert out[0] == safe and "類固醇可以" not in "".join(out) and "血糖" in out[-1]  # zh-TW guidance
    assert state["closed"]


# --- the HTTP server ----------------------------------------------------------------------------

@pytest.fixture()
def server(shoefix_env, tiny_model, tmp_path):
    """The app on a free port in a thread, serving the tiny model with a random adapter as version 1
    (the bare random base only writes line breaks)."""
    import uvicorn

    from shoefix_tasks.model.engines import open_engine
    from shoefix_tasks.ops.answerer import Answerer
    from shoefix_tasks.ops.server import build_app
    from tests.integration.conftest import free_port
    from tests.reliability.test_registry_faults import make_adapter

    adapter = make_adapter(tiny_model, shoefix_env, tmp_path, seed=1)
    engine = open_engine(str(tiny_model), adapter, shoefix_env, engine="transformers", label="tiny")
    cfg = ServeConfig(port=free_port(), poll_s=60, queue_size=2, max_tokens=8)
    answerer = Answerer(shoefix_env, cfg, loader=lambda _s: (engine, {"version": 1, "engine": engine.name}),
                        version_of=lambda _s: 1)
    srv = uvicorn.Server(uvicorn.Config(build_app(shoefix_env, cfg, answerer), host="127.0.0.1", port=cfg.port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{cfg.port}"
    deadline = time.time() + 60
    while not (srv.started and answerer.engine is not None):
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield {"base": base, "answerer": answerer}
    srv.should_exit = True
    thread.join(timeout=30)


def ask(base: str, question: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=120,
                      json={"model": "shoefix-expert", "messages": [{"role": "user", "content": question}], **body})


def test_chat_completions_streamed_and_not_give_the_same_answer(server):
    base = server["base"]
    health = httpx.get(f"{base}/healthz").json()
    assert health["status"] == "ok" and health["serving"]["version"] == 1
    assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "shoefix-expert"

    reply = ask(base, "How do I dry wet leather boots?", max_tokens=6)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "stop"
    text = body["choices"][0]["message"]["content"]
    assert text and body["shoefix"]["version"] == 1

    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120,
                      json={"messages": [{"role": "system", "content": "x"},
                                         {"role": "user", "content": "How do I dry wet leather boots?"}],
                            "max_tokens": 6, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["shoefix"]["version"] == 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text  # greedy: same answer

    # OpenAI-shaped refusals: another model, no user message, a length over the cap
    assert ask(base, "hi", model="gpt-4").status_code == 404
    no_user = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
    assert no_user.status_code == 400 and "error" in no_user.json()
    assert ask(base, "hi", max_tokens=10_000).status_code == 400
    assert ask(base, "hi", max_tokens=0).status_code == 400


def test_the_official_openai_client_talks_to_it(server):
    """What a user's own tooling would do: the `openai` package pointed at the local server."""
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{server['base']}/v1", api_key="not-needed-locally", max_retries=0)
    assert [m.id for m in client.models.list()] == ["shoefix-expert"]
    messages = [{"role": "user", "content": "How do I dry wet leather boots?"}]
    done = client.chat.completions.create(model="shoefix-expert", messages=messages, max_tokens=6)
    text = done.choices[0].message.content
    assert text and done.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="shoefix-expert", messages=messages, max_tokens=6, stream=True)
              if c.choices]
    assert "".join(pieces) == text  # greedy: streamed and not, the same answer
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=messages, max_tokens=6)


def test_sixteen_at_once_against_a_full_queue_get_200_or_503_with_retry_after(server):
    base, answerer = server["base"], server["answerer"]
    answerer.answer_lock.acquire()  # the engine is busy: one job waits in the worker, two in the queue
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(ask, base, f"Question {i}: why do boots smell?", max_tokens=4) for i in range(16)]
            deadline = time.time() + 60
            while sum(f.done() for f in futures) < 13:  # the refused ones come back while the engine is held
                assert time.time() < deadline, [f.result().status_code for f in futures if f.done()]
                time.sleep(0.05)
            answerer.answer_lock.release()
            replies = [f.result() for f in futures]
    finally:
        if answerer.answer_lock.locked():
            answerer.answer_lock.release()
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 3 + [503] * 13, codes
    for r in replies:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["choices"][0]["message"]["content"]
    # nothing crashed: it still answers, and reports an empty queue
    assert ask(base, "Still there?", max_tokens=4).status_code == 200
    assert httpx.get(f"{base}/healthz").json()["queue"] == {"waiting": 0, "size": 2}


@pytest.mark.slow  # converts the real base once per session (shared with tests/registry/test_served.py)
def test_a_tampered_served_gguf_is_refused_and_the_old_champion_keeps_serving(shoefix_env, tmp_path_factory,
                                                                               tmp_path):
    """The real default base through llama.cpp: v1 serves; v2 becomes champion with its served GGUF
    altered by one byte (in the local cache, where the server reads it); the server refuses v2,
    keeps answering with v1 and says why on /healthz."""
    pytest.importorskip("llama_cpp")
    import mlflow
    from fastapi.testclient import TestClient

    from shoefix_tasks.config import REGISTERED_MODEL
    from shoefix_tasks.model.base import SMOLLM2
    from shoefix_tasks.ops.answerer import Answerer
    from shoefix_tasks.ops.server import build_app
    from shoefix_tasks.registry import versions
    from shoefix_tasks.store import tracking
    from tests.real_base import link_converted_base, lora_adapter
    from tests.registry.test_served import flip_one_byte

    s = shoefix_env
    link_converted_base(tmp_path_factory, s)
    adapter = lora_adapter(s, tmp_path / "adapter")[2]
    tracking.configure(s)

    def make_champion() -> int:
        with mlflow.start_run() as run:
            pass
        version = versions.register_version(run.info.run_id, adapter, SMOLLM2, {}, "test", {"max_new_tokens": 8},
                                            settings=s)
        mlflow.MlflowClient().set_registered_model_alias(REGISTERED_MODEL, "champion", version.version)
        return int(version.version)

    v1 = make_champion()
    answerer = Answerer(s, ServeConfig(poll_s=1, queue_size=1))
    answerer.refresh()
    assert answerer.info["version"] == v1 and answerer.info["engine"] == "llama.cpp"
    sha = answerer.info["artifact_sha256"]
    flip_one_byte(s.home / "cache" / "served" / f"{sha}.gguf")  # v2 derives the same bytes: it is read from here
    v2 = make_champion()
    answerer.refresh()
    health = TestClient(build_app(s, answerer.cfg, answerer)).get("/healthz").json()  # no lifespan: no threads
    assert health["status"] == "degraded" and health["serving"]["version"] == v1 and health["champion_alias"] == v2
    assert health["load_error"]["version"] == v2 and "ServedArtifactMismatch" in health["load_error"]["error"]
    assert answerer.engine.answer(QUESTION, 4)  # v1 still answers
    answerer.stop()
