"""The weekly DAG's deadline alert: Airflow's DeadlineAlert (reference: when the run was queued,
interval: the policy's `alerts.late_after_hours`) whose callback notifies through shoefix_notify.

A real late run is impractical here (it needs a scheduler to notice a missed deadline hours later),
so the test does what Airflow does with the alert instead: it serializes the parsed DAG, imports
the callback by the dotted path the serialized DAG carries, and calls it with those kwargs and a
context shaped like the one Airflow builds for a missed deadline (`Deadline.handle_miss`: the run
as the REST API shows it, and the deadline). The message reaches a local Slack webhook and SMTP sink."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, dag_env, write_policy
from tests.dags.test_notifications import SmtpSink, Webhook, connections, endpoints, smtp_text  # noqa: F401

PROBE = '''
import importlib, json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.serialized_objects import DagSerialization

dag = DagBag(dag_folder=sys.argv[1]).dags[sys.argv[2]]
alerts = DagSerialization.to_dict(dag)["dag"].get("deadline") or []
print(json.dumps(alerts))
for alert in alerts:
    cb = alert["callback"]["__data__"]
    module, _, name = cb["path"].rpartition(".")
    context = {"dag_run": {"dag_id": dag.dag_id, "dag_run_id": "scheduled__2026-12-07T03:00:00+08:00",
                           "queued_at": "2026-12-06T19:00:00Z", "state": "running"},
               "deadline": {"id": "d-1", "deadline_time": "2026-12-07T01:00:00Z"}}
    delivered = getattr(importlib.import_module(module), name)(context=context, **cb["kwargs"])
    print(json.dumps({"delivered": delivered}))
'''


def probe(env: dict, dag_id: str) -> list:
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "dags"), dag_id], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith(("[", "{"))]


def test_weekly_dag_alerts_late_runs_through_the_notifiers(tmp_path, endpoints):  # noqa: F811 - imported fixture
    policy = write_policy(tmp_path / "policy.yaml", base=None, alerts={"late_after_hours": 2.5})
    env = {k: v for k, v in dag_env(SHOEFIX_POLICY=policy, AIRFLOW__CORE__LOAD_EXAMPLES="False",
                                    **connections(*endpoints)).items()}
    alerts, result = probe(env, "shoefix_weekly_retrain")
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert["reference"] == {"reference_type": "DagRunQueuedAtDeadline"}
    assert alert["interval"]["__data__"] == 2.5 * 3600  # seconds: the policy's hours
    assert alert["callback"]["__data__"]["path"] == "shoefix_notify.notify_late_run"
    assert alert["callback"]["__data__"]["kwargs"] == {"late_after_hours": 2.5}

    assert sorted(result["delivered"]) == ["shoefix_slack", "shoefix_smtp"]
    (_, body), = Webhook.received
    assert "shoefix_weekly_retrain run scheduled__2026-12-07T03:00:00+08:00 is late" in body["text"]
    assert "2.5 h after it was queued" in body["text"]
    (mail,) = SmtpSink.messages
    assert "Subject: ShoeFix: shoefix_weekly_retrain run" in mail["data"] and "2.5 h" in smtp_text(mail)


def test_only_the_weekly_dag_carries_the_alert():
    # the urgent DAG is run by a person who is watching it; the default policy's 6 h applies to the weekly one
    assert probe(dag_env(AIRFLOW__CORE__LOAD_EXAMPLES="False"), "shoefix_urgent_update") == [[]]
    (alert,) = probe(dag_env(AIRFLOW__CORE__LOAD_EXAMPLES="False"), "shoefix_weekly_retrain")[0]
    assert alert["interval"]["__data__"] == 6 * 3600
