"""The ShoeFix page in a real `airflow api-server`: auth enforced, champion / history / quarantine
shown and escaped, the ask box answered by a real `shoefix serve` (whole, and streamed as server-sent
events to the page's script), a clear message when that server is down, and a headless Chromium
screenshot of a streamed answer.

Run as a script to screenshot any running api-server (how docs/screenshots/shoefix-page.png is made):
  python -m tests.integration.test_plugin_page --base http://127.0.0.1:8080 --token JWT --out page.png
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from shoefix_tasks.records import read_jsonl
from tests.conftest import FIXTURES
from tests.integration.conftest import http

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
XSS_ID = "<img src=x onerror=\"document.title='pwned'\">"
XSS_QUESTION = "<script>document.title='pwned'</script> Why do my boots smell?"
OFF_CORPUS = "Are copper insoles good against fungus?"  # no corpus question comes close (intake.asked)
COPPER = ("Copper kills many bacteria and fungi on contact in laboratory tests, and copper-infused insoles and "
          "socks are sold with that claim, but there is little evidence that they prevent athlete's foot or stop "
          "mold in shoes in everyday wear. What works is keeping the shoes dry: let each pair air out for at least "
          "24 hours between wears, take the insoles out to dry, and wear moisture-wicking socks. Treat a fungal "
          "infection of the skin with an antifungal cream or powder, and see a doctor if it does not clear.")


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def screenshot(base: str, token: str, out: Path, question: str | None = None, width: int = 1400,
               path: str = "/shoefix/", settle_s: float = 0.0, open_forms: bool = False) -> dict:
    """Open `path` in headless Chromium with the UI's `_token` cookie (set over the DevTools
    protocol, as a logged-in browser holds it), optionally ask a question through the page's form,
    and save a full-page PNG. Returns the page's title and visible text. (`path=/plugin/shoefix`
    shows the page inside the Airflow UI; `settle_s` gives the UI's scripts time to render.)"""
    import websocket  # websocket-client

    profile = tempfile.mkdtemp(prefix="shoefix-chromium-")
    proc = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             f"--window-size={width},1000", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            assert time.time() < deadline and proc.poll() is None, "Chromium did not start"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        ws = websocket.create_connection(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"],
                                         timeout=600)
        ids = iter(range(1, 10_000))

        def cdp(method: str, **params) -> dict:
            msg_id = next(ids)
            ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == msg_id:
                    assert "error" not in msg, msg
                    return msg.get("result", {})

        def wait_loaded() -> None:
            deadline = time.time() + 600
            while time.time() < deadline:
                ready = cdp("Runtime.evaluate", expression="document.readyState + ' ' + location.href",
                            returnByValue=True)["result"]["value"]
                if ready.startswith("complete") and path in ready:
                    return
                time.sleep(0.3)
            raise AssertionError("page did not load")

        cdp("Network.enable")
        cdp("Network.setCookie", name="_token", value=token, url=base, httpOnly=True)
        cdp("Page.enable")
        cdp("Page.navigate", url=f"{base}{path}")
        wait_loaded()
        time.sleep(settle_s)
        if question is not None:
            # requestSubmit, as a click does: the page's script streams the answer into the page
            cdp("Runtime.evaluate", expression=f"document.querySelector('textarea').value = {json.dumps(question)};"
                                               "document.querySelector('form').requestSubmit()")
            time.sleep(0.5)
            deadline = time.time() + 600
            while "answered by" not in cdp("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                           returnByValue=True)["result"]["value"]:
                assert time.time() < deadline, "no answer"
                time.sleep(0.5)
            wait_loaded()
        if open_forms:  # the newest answer's correction form, folded by default
            cdp("Runtime.evaluate", expression="document.querySelector('details').open = true")
        height = cdp("Runtime.evaluate", expression="document.documentElement.scrollHeight",
                     returnByValue=True)["result"]["value"]
        cdp("Emulation.setDeviceMetricsOverride", width=width, height=int(height), deviceScaleFactor=1, mobile=False)
        png = base64.b64decode(cdp("Page.captureScreenshot", format="png")["data"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
        info = cdp("Runtime.evaluate", expression="JSON.stringify({title: document.title, text: document.body.innerText,"
                                                  " images: document.images.length})",
                   returnByValue=True)["result"]["value"]
        ws.close()
        return json.loads(info)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_shoefix_page(shoefix_env, lenient_policy, shoefix_server, api_server, tmp_path):
    from tests.integration.test_registry_serving import run_pipeline

    s, base, token = shoefix_env, api_server["base"], api_server["token"]
    page = f"{base}/shoefix/"

    # Airflow's auth applies: no token, a forged token -> refused
    assert http(page)[0] == 401
    assert http(page, token="not-a-jwt")[0] in (401, 403)
    assert http(f"{base}/shoefix/ask", form={"question": "hi"})[0] == 401
    # the UI lists the view in its navigation
    status, body = http(f"{base}/api/v2/plugins", token)
    views = [v for p in json.loads(body)["plugins"] for v in p["external_views"]]
    assert any(v["name"] == "ShoeFix" and v["href"] == "shoefix/" and v["url_route"] == "shoefix" for v in views)

    # nothing registered yet: the page says so, and asking gives a clear error (not a stack trace)
    status, body = http(page, token)
    assert status == 200 and "No champion yet" in body
    status, body = http(f"{base}/shoefix/ask", token, form={"question": "How do I dry wet boots?"})
    assert status == 503 and "no champion to serve" in body

    # a batch with hostile record text, quarantined; then a real pipeline promotes v1
    shutil.copyfile(FIXTURES / "corpus_small.jsonl", s.home / "inbox" / "a.jsonl")
    bad = {"id": XSS_ID, "question": XSS_QUESTION, "answer": "too short", "topic": "odor", "lang": "en"}
    (s.home / "inbox" / "b.jsonl").write_text(json.dumps(bad) + "\n" + "{not json\n")
    first = run_pipeline(s, "tiny", "run-page-1")
    assert first["champion"] == 1

    status, body = http(page, token)
    assert status == 200
    assert '<div class="big">v1</div>' in body and "by test" in body and "Scorecard of v1" in body
    assert "content completeness" in body and "base (before)" in body
    import mlflow

    v1 = mlflow.MlflowClient().get_model_version("shoefix-expert", "1").tags
    for key, label in (("recipe_sha256", "recipe content"), ("corpus_snapshot", "corpus snapshot"),
                       ("holdout_hash", "holdout")):  # which recipe text, corpus and holdout made v1
        assert f"<th>{label}</th><td><code>{v1[key][:16]}…</code>" in body, key
    row = body.split("Recent batches", 1)[1].split("run-page-1", 1)[1].split("</tr>", 1)[0]
    records, accepted, quarantined, deferred = map(int, re.findall(r'<td class="n">(\d+)</td>', row))
    n = len((FIXTURES / "corpus_small.jsonl").read_text().splitlines())
    # every fixture record accepted; the short answer and the broken JSON line quarantined
    assert (records, accepted, quarantined, deferred) == (n + 2, n, 2, 0)
    assert "parse" in row  # the reason of the broken line
    assert body.count("<script>") == 1 and "<img" not in body and "&lt;img src=x" in body  # ours only; escaped

    # the answer server picks up v1 within a poll; the page forwards to it (no model in the api-server)
    shoefix_server["wait"](lambda h: (h["serving"] or {}).get("version") == 1)
    status, body = http(f"{base}/shoefix/ask", token, form={"question": "How do I dry wet leather boots?"})
    assert status == 200 and "answered by v1" in body and '<div class="answer" id="answer">' in body
    status, body = http(f"{base}/shoefix/ask", token, form={"question": "How do I dry wet leather boots?"},
                        headers={"Accept": "text/event-stream"})
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1]["done"]["version"] == 1 and all("error" not in e for e in events)

    # the browser: logged in with the UI's cookie, the page renders, the hostile text stays text
    browser = chromium() is not None
    if browser:
        shot = tmp_path / "shoefix-page.png"
        info = screenshot(base, token, shot, question="Is bleach safe on leather?")
        assert info["title"] == "ShoeFix" and info["images"] == 0
        assert "answered by v1" in info["text"] and XSS_ID in info["text"]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    # the loop (issue 15): the server logs every answer and sends it to MLflow as a trace; a question the
    # corpus does not cover is listed; a reviewer corrects the answer through the page; the next run's
    # collect and validation take the correction like any record, with its provenance
    from shoefix_tasks import pipeline
    from shoefix_tasks.registry import answer_log

    status, body = http(f"{base}/shoefix/ask", token, form={"question": OFF_CORPUS})
    assert status == 200 and "answer " in body
    (served,) = [a for a in answer_log.iter_answers(s) if a["question"] == OFF_CORPUS]
    assert served["answer_id"][:12] in body and served["model_version"] == "1"
    deadline = time.time() + 120
    while not (answer_log.find_answer(s, served["answer_id"]) or {}).get("trace_id"):
        assert time.time() < deadline, "the answer never reached MLflow as a trace"
        time.sleep(0.5)
    trace_id = answer_log.find_answer(s, served["answer_id"])["trace_id"]
    status, body = http(page, token)
    coverage = body.split("Asked, not in the corpus", 1)[1]
    assert status == 200 and OFF_CORPUS in coverage and "Mark wrong and correct it" in body
    assert "How do I dry wet leather boots?" not in coverage  # the corpus asks that one
    status, body = http(f"{base}/shoefix/feedback", token, form={"answer_id": served["answer_id"], "source": "x",
                                                                   "corrected_answer": " "})
    assert status == 400 and "the corrected answer is empty" in body
    status, body = http(f"{base}/shoefix/feedback", token, form={
        "answer_id": served["answer_id"], "corrected_answer": COPPER, "source": "AAD-AF; manufacturer claims reviewed",
        "reason": "the answer invented a cure", "topic": "materials"})
    assert status == 200 and "is in the inbox" in body and "corrected" in body
    mlflow.set_tracking_uri(s.tracking_uri)
    marks = {a.name: a for a in mlflow.get_trace(trace_id).info.assessments}
    assert marks["correct"].value is False and marks["correct"].source.source_id == "shoefix"  # the signed-in user
    collect = pipeline.collect_qa("run-page-2", s)
    validated = pipeline.validate_qa("run-page-2", settings=s)
    assert collect["collected"] == 1 and validated["accepted"] == 1, (collect, validated)
    (record,) = [r for r in read_jsonl(Path(validated["snapshot_path"])) if r["question"] == OFF_CORPUS]
    assert record["answer"] == COPPER and record["contributor"] == "shoefix"
    assert (record["provenance"]["trace_id"], record["provenance"]["model_version"]) == (trace_id, "1")

    if browser:
        loop = screenshot(base, token, tmp_path / "shoefix-page-feedback.png", open_forms=True)
        assert "Send correction" in loop["text"] and OFF_CORPUS in loop["text"]

    # the answer server stops: the page says so and names the command that starts it
    shoefix_server["stop"]()
    status, body = http(f"{base}/shoefix/ask", token, form={"question": "Is bleach safe on leather?"})
    assert status == 503 and "answer server is not running" in body and "shoefix serve" in body
    status, body = http(f"{base}/shoefix/ask", token, form={"question": "Is bleach safe?"},
                        headers={"Accept": "text/event-stream"})
    assert status == 503 and "shoefix serve" in json.loads(body)["error"]
    if not browser:
        pytest.skip("no Chromium on this machine: everything but the browser checks ran")


def main() -> None:
    p = argparse.ArgumentParser(description="Screenshot the ShoeFix page of a running api-server.")
    p.add_argument("--base", required=True, help="api-server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--token", required=True, help="an Airflow JWT (POST /auth/token)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--question", default=None, help="also ask this through the form")
    p.add_argument("--path", default="/shoefix/", help="/plugin/shoefix: the page inside the Airflow UI")
    p.add_argument("--settle-s", type=float, default=0.0)
    p.add_argument("--width", type=int, default=1400)
    print(json.dumps(screenshot(**{k: v for k, v in vars(p.parse_args()).items()}))[:400])


if __name__ == "__main__":
    main()
