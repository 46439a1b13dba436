"""The optional LLM judge against a small local server speaking the OpenAI chat-completions API."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from shoefix_tasks.evaluation.judge import JudgeConfig, JudgeError, judge_answer, judge_side


class FakeOpenAI(BaseHTTPRequestHandler):
    mode = "ok"
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.seen.append((self.path, self.headers.get("Authorization"), body))
        if FakeOpenAI.mode == "503":
            self.send_response(503)
            self.end_headers()
            return
        n = len(FakeOpenAI.seen)
        scores = {"completeness": 7, "key_data_accuracy": 6 + n % 2, "semantic_consistency": 8, "readability": 9}
        content = f"Sure! {json.dumps(scores)}" if FakeOpenAI.mode == "ok" else "I refuse to grade."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = HTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    FakeOpenAI.seen, FakeOpenAI.mode = [], "ok"
    yield f"http://127.0.0.1:{srv.server_port}/v1"
    srv.shutdown()


def test_repeated_judging_with_fixed_temperature_reports_variance(server):
    cfg = JudgeConfig(base_url=server, model="judge-1", api_key="sk-test", repeats=4)
    out = judge_answer(cfg, "q?", "reference", "answer")
    assert out["completeness"] == 7 and out["readability"] == 9
    assert out["key_data_accuracy"] == 6.5 and out["key_data_accuracy_var"] == 0.25
    assert len(FakeOpenAI.seen) == 4
    path, auth, body = FakeOpenAI.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["temperature"] == 0 and body["model"] == "judge-1"
    assert "sk-test" not in repr(cfg)


def test_side_summary(server):
    cfg = JudgeConfig(base_url=server, model="m", repeats=2)
    out = judge_side(cfg, [{"question": "q", "answer": "r"}] * 3, ["a", "b", "c"])
    assert out["summary"]["judge_readability"] == 9 and len(out["per_question"]) == 3


@pytest.mark.parametrize("mode", ["503", "garbage"])
def test_failures_raise(server, mode):
    FakeOpenAI.mode = mode
    with pytest.raises(JudgeError):
        judge_answer(JudgeConfig(base_url=server, model="m", repeats=1), "q", "r", "a")


def test_unreachable_judge_raises():
    with pytest.raises(JudgeError):
        judge_answer(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", repeats=1, timeout_s=2), "q", "r", "a")


def test_configured_judge_failure_reaches_the_gate_closed(server):
    from shoefix_tasks.evaluation.evaluate import run_judge
    from shoefix_tasks.evaluation.gate import Scorecard, decide
    from shoefix_tasks.policy import GateConfig

    FakeOpenAI.mode = "503"
    items = [{"question": "q", "answer": "r"}]
    result = {w: {"scores": [{"answer": "a"}], "summary": {}} for w in ("champion", "challenger")}
    run_judge(JudgeConfig(base_url=server, model="m", repeats=1), items, result)
    assert "503" in result["judge_error"]
    ids = {f"q{i}": 5.0 for i in range(10)}
    better = {k: 8.0 for k in ids}
    d = decide(Scorecard(ids, ids, 1.0), Scorecard(better, better, 1.0), GateConfig(),
               judge_error=result["judge_error"])
    assert not d.promote
