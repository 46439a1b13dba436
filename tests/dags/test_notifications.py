"""Failure and promotion notifications, through Airflow's real callback machinery and the real
Slack / SMTP provider notifiers, delivered to a local webhook endpoint and a local SMTP sink.

A small DAG (written by the test) fails one task and "promotes" in another, with the notifier
the ShoeFix DAGs use; `airflow dags test` runs it with the connections given as environment
variables, then without them (nothing sent, nothing else fails). The ShoeFix DAGs are checked to
carry the same callbacks."""

from __future__ import annotations

import json
import socketserver
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT, dag_env, fresh_airflow_home

SECRET_TOKEN = "T0001/B0001/s3cr3t-webhook-token"
DAG = '''
import pendulum
from airflow.sdk import dag, task
from shoefix_notify import ShoeFixNotifier


@task(retries=0, on_failure_callback=ShoeFixNotifier("failure"))
def train_adapter():
    raise RuntimeError("CUDA out of memory; password=hunter2")  # must not reach a message


@task(retries=0, on_success_callback=ShoeFixNotifier("champion"))
def gate_and_promote():
    return {"version": 7, "decision": "promote", "reasons": ["composite gain +0.4 above min effect 0.1"],
            "champion": 7, "model": "shoefix-expert"}


@task(retries=0, on_success_callback=ShoeFixNotifier("champion"))
def keep_champion():
    return {"version": 8, "decision": "keep_champion", "reasons": ["tie"], "champion": 7}


@task(retries=0, on_success_callback=ShoeFixNotifier("use"))
def summarize_use():
    return {"answers": 12, "traces_waiting": 0, "traces_dropped": 0, "corrections": 1,
            "uncovered": {"unknown": [{"question": "How do I sharpen ice skates?", "asked": 3}]}}

@dag(dag_id="notify_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False)
def notify_probe():
    train_adapter()
    gate_and_promote()
    keep_champion()
    summarize_use()


notify_probe()
'''


class Webhook(BaseHTTPRequestHandler):
    received: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append((self.path, json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class SmtpSink(socketserver.StreamRequestHandler):
    """Just enough SMTP (RFC 5321) to accept mail: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    messages: list[dict] = []

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self):
        self.reply("220 sink ESMTP")
        mail: dict = {"rcpt": []}
        while line := self.rfile.readline():
            cmd = line.decode().strip()
            verb = cmd[:4].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 sink")
            elif verb == "MAIL":
                mail = {"from": cmd[10:], "rcpt": []}
                self.reply("250 OK")
            elif verb == "RCPT":
                mail["rcpt"].append(cmd[8:])
                self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 end with <CRLF>.<CRLF>")
                data = []
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data.append(chunk.decode())
                mail["data"] = "".join(data)
                SmtpSink.messages.append(mail)
                self.reply("250 queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:  # RSET, NOOP
                self.reply("250 OK")


def connections(web_port: int, smtp_port: int) -> dict[str, str]:
    """`shoefix_slack` and `shoefix_smtp` as environment variables, pointing at the local sinks."""
    return {
        "AIRFLOW_CONN_SHOEFIX_SLACK": json.dumps({"conn_type": "slackwebhook", "host": f"http://127.0.0.1:{web_port}",
                                                  "password": SECRET_TOKEN}),
        "AIRFLOW_CONN_SHOEFIX_SMTP": json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": smtp_port,
                                                 "extra": {"to": "ops@example.com", "from_email": "shoefix@example.com",
                                                           "disable_ssl": True, "disable_tls": True,
                                                           "retry_limit": 0}}),
    }


def smtp_text(message: dict) -> str:
    """The decoded, unescaped text of a message the SMTP sink received (the notifier sends HTML)."""
    import email
    import html

    parsed = email.message_from_string(message["data"])
    parts = parsed.walk() if parsed.is_multipart() else [parsed]
    return "\n".join(html.unescape(p.get_payload(decode=True).decode(p.get_content_charset() or "utf-8"))
                     for p in parts if p.get_content_maintype() == "text")


@pytest.fixture()
def endpoints():
    Webhook.received.clear()
    SmtpSink.messages.clear()
    web = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    smtp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), SmtpSink)
    for server in (web, smtp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield web.server_address[1], smtp.server_address[1]
    for server in (web, smtp):
        server.shutdown()
        server.server_close()


def run_probe(tmp_path, template, extra_env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """`airflow dags test notify_probe` over a fresh copy of the session's migrated metadata DB."""
    dags = tmp_path / "dags"
    dags.mkdir(exist_ok=True)
    (dags / "notify_probe.py").write_text(DAG)
    home = fresh_airflow_home(tmp_path / "airflow", template)
    env = {k: v for k, v in dag_env().items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db", **extra_env)
    proc = subprocess.run(["airflow", "dags", "test", "notify_probe"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    with sqlite3.connect(home / "airflow.db") as conn:
        states = dict(conn.execute("select task_id, state from task_instance where run_id = "
                                   "(select run_id from dag_run order by id desc limit 1)").fetchall())
    return proc.stdout + proc.stderr, states


@pytest.mark.slow
def test_failure_and_promotion_reach_slack_and_smtp(endpoints, tmp_path, airflow_db_template):
    log, states = run_probe(tmp_path, airflow_db_template, connections(*endpoints))
    assert states == {"train_adapter": "failed", "gate_and_promote": "success", "keep_champion": "success",
                      "summarize_use": "success"}, log[-3000:]

    # Slack: one failure, one promotion (keeping the champion announces nothing), the weekly use summary,
    # at the webhook's path
    assert [path for path, _ in Webhook.received] == [f"/{SECRET_TOKEN}"] * 3, log[-3000:]
    texts = sorted(body["text"] for _, body in Webhook.received)
    assert "notify_probe.train_adapter failed" in texts[0] and "RuntimeError" in texts[0]
    assert "shoefix-expert v7 is the new champion" in texts[1] and "composite gain +0.4" in texts[1]
    assert "what users asked" in texts[2] and "[unknown] How do I sharpen ice skates? (x3)" in texts[2]
    # SMTP: the same three messages to the connection's recipients
    assert len(SmtpSink.messages) == 3
    assert all(m["rcpt"] == ["<ops@example.com>"] for m in SmtpSink.messages)
    subjects = sorted(line for m in SmtpSink.messages for line in m["data"].splitlines() if line.startswith("Subject:"))
    assert subjects == ["Subject: ShoeFix: notify_probe.train_adapter failed",
                        "Subject: ShoeFix: shoefix-expert v7 is the new champion",
                        "Subject: ShoeFix: what users asked (notify_probe, run " + subjects[2].split("run ")[1]]
    # no secret in any message: not the webhook token, not the exception's text
    everything = json.dumps([body for _, body in Webhook.received]) + json.dumps(SmtpSink.messages)
    assert "s3cr3t" not in everything and "hunter2" not in everything


@pytest.mark.slow
def test_no_connection_is_silent(endpoints, tmp_path, airflow_db_template):
    log, states = run_probe(tmp_path, airflow_db_template, {})
    assert states == {"train_adapter": "failed", "gate_and_promote": "success", "keep_champion": "success",
                      "summarize_use": "success"}, log[-3000:]
    assert Webhook.received == [] and SmtpSink.messages == []


def test_shoefix_dags_carry_the_notifiers():
    code = ("import sys; from airflow.dag_processing.dagbag import DagBag; "
            "import json; from shoefix_notify import ShoeFixNotifier as N; b = DagBag(dag_folder=sys.argv[1]); "
            "ev = lambda cbs: sorted(c.event for c in (cbs or []) if isinstance(c, N)); "
            "print(json.dumps({f'{d}.{t.task_id}': [ev(t.on_failure_callback), ev(t.on_success_callback)] "
            "for d, dag in b.dags.items() for t in dag.tasks}))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags")], capture_output=True, text=True, timeout=180,
                         env=dag_env())
    assert out.returncode == 0, out.stderr[-3000:]
    callbacks = json.loads(out.stdout.strip().splitlines()[-1])
    assert callbacks and all(fail == ["failure"] for fail, _ in callbacks.values()), callbacks
    promoting = {k for k, (_, ok) in callbacks.items() if ok == ["champion"]}
    assert promoting == {"shoefix_weekly_retrain.gate_and_promote", "shoefix_urgent_update.gate_and_promote",
                         "shoefix_weekly_retrain.apply_review", "shoefix_urgent_update.apply_review",
                         "shoefix_rollback.rollback_champion"}
