"""Data-aware scheduling, run for real with `airflow dags test`: the inbox watcher announces new
files once, collect_qa / validate_qa emit their Asset events with the batch's metadata, and the
weekly DAG is scheduled on the inbox Asset only when the setting is on."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES, ROOT, airflow_env, dag_env

DAGS = ROOT / "dags"


def events(db) -> list[tuple[str, dict]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select a.uri, e.extra from asset_event e join asset a on a.id = e.asset_id "
                            "order by e.id").fetchall()
    return [(uri, json.loads(extra) if extra else {}) for uri, extra in rows]


def airflow(env, *args) -> str:
    proc = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_asset_events_emitted_with_metadata(shoefix_env, airflow_home):
    s = shoefix_env
    db = airflow_home / "airflow.db"  # migrated (a copy of the session's `airflow db migrate`)
    env = airflow_env(s, airflow_home)

    # an empty inbox: the watcher runs and announces nothing
    airflow(env, "dags", "test", "shoefix_inbox_watch")
    assert events(db) == []

    # new Q&A lands: announced once, with what is pending; the same state is not announced again
    shutil.copyfile(FIXTURES / "corpus_small.jsonl", s.home / "inbox" / "week1.jsonl")
    size = (s.home / "inbox" / "week1.jsonl").stat().st_size
    airflow(env, "dags", "test", "shoefix_inbox_watch")
    airflow(env, "dags", "test", "shoefix_inbox_watch")
    announced = events(db)
    assert [uri for uri, _ in announced] == ["shoefix://inbox/new"]
    assert announced[0][1]["files"] == 1 and announced[0][1]["bytes"] == size
    assert announced[0][1]["names"] == ["week1.jsonl"]

    # the retraining DAG collects and validates for real (training and later are marked done):
    # both steps publish their Asset with the batch id and counts
    # (the quarantine limit is the policy's, no longer a param)
    log = airflow(env, "dags", "test", "shoefix_weekly_retrain",
                  "--mark-success-pattern", "train_adapter|evaluate_adapter|gate_and_promote")
    assert "state=success" in log
    by_uri = {uri: extra for uri, extra in events(db)}
    collected, accepted = by_uri["shoefix://inbox/collected"], by_uri["shoefix://corpus/accepted"]
    n = len((FIXTURES / "corpus_small.jsonl").read_text().splitlines())
    assert collected["batch_id"] == accepted["batch_id"] and collected["batch_id"].startswith("manual__")
    assert collected["files"] == 1 and collected["seen"] == n
    assert accepted["accepted"] + accepted["quarantined"] == n and accepted["accepted"] > 0
    assert len(accepted["snapshot_hash"]) == 64

    # nothing new: an idle run and the watcher publish no event at all
    before = len(events(db))
    airflow(env, "dags", "test", "shoefix_weekly_retrain",
            "--mark-success-pattern", "train_adapter|evaluate_adapter|gate_and_promote")
    airflow(env, "dags", "test", "shoefix_inbox_watch")
    assert len(events(db)) == before


@pytest.mark.parametrize("setting", ["off", "on"])
def test_weekly_schedule_follows_the_setting(setting):
    code = ("import sys; from airflow.dag_processing.dagbag import DagBag; "
            "b = DagBag(dag_folder=sys.argv[1]); assert not b.import_errors, b.import_errors; "
            "w, i = b.dags['shoefix_weekly_retrain'], b.dags['shoefix_inbox_watch']; "
            "print(type(w.timetable).__name__, getattr(w.timetable, 'asset_condition', None) is not None, "
            "i.timetable.can_be_scheduled)")
    env = {**dag_env(), "SHOEFIX_ASSET_TRIGGER": setting}
    out = subprocess.run([sys.executable, "-c", code, str(DAGS)], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    kind, on_asset, watch_scheduled = out.stdout.split()[-3:]
    if setting == "on":
        assert (kind, on_asset, watch_scheduled) == ("AssetOrTimeSchedule", "True", "True")
    else:
        assert (kind, on_asset, watch_scheduled) == ("CronTriggerTimetable", "False", "False")
