"""Secrets and PII stay where they belong.

1. No secret-looking literal in the code, DAGs, plugins or deployment files: credentials come from
   connections and the environment only.
2. A real `airflow dags test shoefix_weekly_retrain` that *uses* a secret (the LLM judge's API key,
   from connection `shoefix_judge` given as an environment variable, sent to a local fake
   OpenAI-compatible server) and ingests Q&A carrying an email, a phone number and a national ID:
   - the secret appears nowhere: not in the run's output (task logs), the Airflow metadata DB
     (XCom, rendered fields), the log folder, MLflow (params, tags, artifacts, its DB), the ledger,
     the snapshot, the GX project;
   - the PII appears nowhere either, except in the ledger, which is the quarantine audit store:
     the quarantined record keeps its raw bytes there so it can be fixed and replayed.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from shoefix_tasks.intake.screening import SECRET_PATTERNS
from tests.conftest import FIXTURES, ROOT, airflow_env
from tests.integration.test_weekly_dag_e2e import airflow

SCANNED = ("dags", "plugins", "shoefix_tasks", "docker", "mlflow", "scripts")
SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".cfg", ".ini", ".toml", ".json", ".env", ".conf", ""}
# name = "literal": a credential-like name bound to a quoted literal of 6+ characters
ASSIGNED = re.compile(r"""(?i)\b[\w-]*(?:password|passwd|secret|token|api_?key|access_?key|credential)[\w-]*"""
                      r"""["']?\s*[:=]\s*(["'])([^"'\s]{6,})\1""")
# scheme://user:password@host with a literal password (an interpolated ${VAR} / $VAR is fine)
URL_PASSWORD = re.compile(r"""\b[a-z][a-z0-9+.-]*://[^/\s:@'"]+:([^@\s/'"]{4,})@""")


def secret_literals(text: str) -> list[str]:
    found = [m.group(0) for name in ("api_key", "private_key") for m in SECRET_PATTERNS[name].finditer(text)]
    found += [m.group(0) for m in ASSIGNED.finditer(text) if not m.group(2).startswith(("$", "<", "{"))]
    found += [m.group(0) for m in URL_PASSWORD.finditer(text) if not m.group(1).startswith(("$", "<", "{"))]
    return found


def test_the_scanner_finds_planted_secrets():
    planted = ['API_KEY = "sk-live-4f9a8b7c6d5e4f3a2b1c"', 'conn = "postgresql://shoefix:s3cretpass@db:5432/x"',
               "key = 'AKIAABCDEFGHIJKLMNOP'", '{"api_key": "abcdef123456"}', "-----BEGIN RSA PRIVATE KEY-----"]
    for text in planted:
        assert secret_literals(text), text
    assert secret_literals('token = "tok_live_abcdef"') and not secret_literals('password = os.environ["PW"]')
    assert not secret_literals("postgresql+psycopg://shoefix:${POSTGRES_PASSWORD}@postgres/airflow")


def test_no_secret_literal_in_code_dags_plugins_or_deployment_files():
    hits = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                hits += [f"{path.relative_to(ROOT)}: {hit}" for hit in secret_literals(path.read_text(errors="replace"))]
    assert not hits, "secret-looking literals:\n" + "\n".join(hits)


class FakeJudge(BaseHTTPRequestHandler):
    """OpenAI-compatible chat completions; remembers the Authorization headers it was sent."""

    auth: list[str] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        FakeJudge.auth.append(self.headers.get("Authorization", ""))
        scores = {"completeness": 5, "key_data_accuracy": 5, "semantic_consistency": 5, "readability": 5}
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps(scores)}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


PII = {"email": "mei.lin.chen@example.com", "phone": "0912-345-678", "national_id": "A123456789"}


def pii_records() -> list[dict]:
    rows = [json.loads(x) for x in (FIXTURES / "corpus_more.jsonl").read_text().splitlines()]
    keep = ("id", "question", "answer", "topic", "lang")
    a, b, c = ({k: r[k] for k in keep} for r in rows[:3])
    a["answer"] += f" Questions? Write to {PII['email']} any time."
    b["answer"] = f"Call {PII['phone']}."  # also too short: GX fails it and must not echo it
    c["question"] = f"My ID is {PII['national_id']}. " + c["question"]
    c["topic"] = PII["email"]  # an unknown topic GX reports, and must not echo either
    return [a, b, c]


def files_under(folder: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not any(p.is_relative_to(s) for s in skip)]


def where(needle: str, paths: list[Path], texts: dict[str, str]) -> list[str]:
    raw = needle.encode()
    hits = [str(p) for p in paths if raw in p.read_bytes()]
    return hits + [name for name, text in texts.items() if needle in text]


@pytest.mark.slow
def test_a_run_that_uses_a_secret_and_ingests_pii_leaks_neither(shoefix_env, lenient_policy, airflow_home):
    import mlflow

    s = shoefix_env
    key = "sk-shoefix-" + secrets.token_hex(16)
    srv = HTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    FakeJudge.auth = []
    conn = {"conn_type": "http", "host": f"http://127.0.0.1:{srv.server_port}/v1", "password": key,
            "extra": {"model": "judge", "repeats": 1}}
    env = airflow_env(s, airflow_home, AIRFLOW_CONN_SHOEFIX_JUDGE=json.dumps(conn))  # its DB already migrated
    shutil.copyfile(FIXTURES / "corpus_small.jsonl", s.home / "inbox" / "week1.jsonl")
    (s.home / "inbox" / "from-experts.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pii_records()))
    overrides = {"train.num_train_epochs": 1}  # the tiny recipe already answers in 12 tokens
    try:
        out = airflow(env, "dags", "test", "shoefix_weekly_retrain", "-c",
                      json.dumps({"recipe": "tiny", "overrides": overrides}))
    finally:
        srv.shutdown()
    assert "state=success" in out
    assert FakeJudge.auth and set(FakeJudge.auth) == {f"Bearer {key}"}  # the run really used the secret

    client = mlflow.MlflowClient(tracking_uri=s.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.tags.get("shoefix.stage") for r in runs} >= {"validate", "train", "evaluate"}
    mlflow_text = json.dumps([{"params": r.data.params, "tags": r.data.tags, "name": r.info.run_name}
                              for r in runs])
    ledger_db = s.home / "ledger.db"
    everywhere = files_under(airflow_home) + files_under(s.home, skip=(s.home / "inbox",))
    texts = {"airflow dags test output (task logs)": out, "MLflow params and tags": mlflow_text}
    assert not where(key, everywhere, texts), "the judge's API key leaked"

    # PII: quarantined with its raw bytes in the ledger (the audit store) and nowhere else
    not_audit = [p for p in everywhere if not p.name.startswith(ledger_db.name)]
    assert any(p.suffix == ".html" for p in not_audit) and any("snapshots" in p.parts for p in not_audit)
    for kind, value in PII.items():
        assert not where(value, not_audit, texts), f"{kind} leaked"
    import sqlalchemy as sa

    from shoefix_tasks.store import ledger
    with ledger.engine_for(s.ledger_url).connect() as c:
        raw = b"\n".join(r for (r,) in c.execute(sa.select(ledger.records.c.raw).where(
            ledger.records.c.status == "quarantined")))
    assert all(v.encode() in raw for v in PII.values())
