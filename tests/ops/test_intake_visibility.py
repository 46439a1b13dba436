"""What an operator is shown about intake: the ShoeFix page lists deferred inbox files with their
age; `shoefix status` labels the scorecard with its run and time; `make demo` (scripts/demo.sh)
prints a scorecard only when its own run produced one, and otherwise what the run did."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

from shoefix_tasks.intake.collect import collect_batch
from shoefix_tasks.ops import dashboard
from tests.conftest import FIXTURES, ROOT, env_with

ROWS = [json.loads(x) for x in (FIXTURES / "corpus_small.jsonl").read_text().splitlines()]
TAIL = b'{"id": "w-9", "question": "Why do my boots smell after'
XSS_NAME = "<img src=x onerror=alert(1)>.jsonl"
SUMMARY = {"completeness": 3.0, "key_data_accuracy": 3.0, "semantic_consistency": 3.0, "readability": 3.0,
           "latency_p50_s": 1.0}


def line(i: int) -> bytes:
    return json.dumps({k: ROWS[i][k] for k in ("id", "question", "answer", "topic", "lang")}).encode() + b"\n"


def put(s, name: str, data: bytes, age_s: float = 0.0) -> None:
    path = s.home / "inbox" / name
    path.write_bytes(data)
    when = time.time() - age_s
    os.utime(path, (when, when))


def old_evaluation(s, run_key: str = "scheduled__2026-11-29") -> None:
    """An earlier run's evaluation.json (the shape evaluation/evaluate.py writes)."""
    path = s.run_dir(run_key) / "evaluation.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run_key": run_key, "champion": {"label": "base", "summary": SUMMARY, "scores": []},
                                "challenger": {"label": "challenger", "summary": SUMMARY, "scores": []}}))
    when = 1_764_417_600  # 2025-11-29 12:00 UTC
    os.utime(path, (when, when))


def render_page(settings) -> str:
    spec = importlib.util.spec_from_file_location("shoefix_page_ops", ROOT / "plugins" / "shoefix_page.py")
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    return page.render(settings)


def test_page_lists_deferred_files_with_their_age(shoefix_env, monkeypatch):
    s = shoefix_env
    monkeypatch.delenv("SHOEFIX_TRUNCATED_GRACE_S", raising=False)
    put(s, XSS_NAME, line(1) + TAIL, age_s=240)
    collect_batch(s, "run-1")
    (waiting,) = dashboard.deferred_files(s)
    assert waiting["name"] == XSS_NAME and waiting["size"] == len(line(1) + TAIL) and waiting["batch_id"] == "run-1"
    assert 240 <= waiting["age_s"] < 300 and waiting["age"] == "4 min" and waiting["grace"] == "60 min"
    assert 3300 < waiting["due_in_s"] <= 3360
    html = render_page(s)
    assert "Deferred inbox files" in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.jsonl</code></td><td class=\"n\">" in html
    assert '<td class="n">4 min</td>' in html

    put(s, XSS_NAME, line(1) + line(2))  # the writer finished: read, and no longer listed
    assert collect_batch(s, "run-2").collected == 2
    assert dashboard.deferred_files(s) == []
    assert "no inbox file is waiting" in render_page(s)


def test_status_labels_the_scorecard_with_its_run_and_time(shoefix_env):
    s = shoefix_env
    old_evaluation(s)
    out = subprocess.run([sys.executable, "-m", "shoefix_tasks.ops.cli", "status"], env=env_with(s),
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ("Scorecard of the last evaluation: run scheduled__2026-11-29, evaluated 2025-11-29 12:00 UTC "
            "(base = before, challenger = after):") in out.stdout


def test_demo_prints_what_happened_not_an_earlier_scorecard(shoefix_env, tmp_path):
    """scripts/demo.sh for real (airflow db migrate + dags test) on a state where an earlier run left
    a scorecard and this run finds only a cut-off file: it must not print that scorecard."""
    s = shoefix_env
    put(s, "a.jsonl", line(1) + line(2))
    collect_batch(s, "earlier")  # already processed: nothing new for the demo's run
    put(s, "w.jsonl", line(3) + TAIL, age_s=120)
    old_evaluation(s)
    airflow_home = tmp_path / "airflow"
    env = env_with(s, AIRFLOW_HOME=airflow_home, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{airflow_home}/airflow.db",
                   SHOEFIX_TRUNCATED_GRACE_S=3600)
    env.pop("SHOEFIX_POLICY", None)
    # the `shoefix` command as the package defines it, whatever the venv's entry-point scripts say
    env["BASH_FUNC_shoefix%%"] = '() { python -m shoefix_tasks.ops.cli "$@"; }'
    out = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Scorecard of" not in out.stdout and "content completeness" not in out.stdout
    assert "No scorecard from this run manual__" in out.stdout
    assert re.search(r"\n  nothing new: 1 file deferred \(w\.jsonl: truncated, \d+ min old; grace 60 min\)\n", out.stdout)
