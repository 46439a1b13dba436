"""Issue 7, scenario 8 (and issue 6's promotion lock): two runs racing to promote are serialized,
leave exactly one champion, and it is the better candidate. The lock itself is tested across real
processes on both ledgers the product runs on: SQLite (embedded) and Postgres (full stack).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import FIXTURES, ROOT, env_with, write_policy
from tests.reliability.test_registry_faults import direct_client, http_env, mlflow_http  # noqa: F401 - fixtures
from tests.store.test_ledger_postgres import postgres_url  # noqa: F401 - fixture

WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from shoefix_tasks.store import lease, ledger
    url, name, rounds, counter, events = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
    engine = ledger.engine_for(url)
    for _ in range(rounds):
        with lease.Lease(engine, "race", name, ttl_s=5, wait_s=120, poll_s=0.02):
            t_in = time.time()
            n = int(counter.read_text())      # read-modify-write: lost updates if two ever overlap
            time.sleep(0.03)
            counter.write_text(str(n + 1))
            with open(events, "a") as fh:
                fh.write(json.dumps([name, t_in, time.time()]) + "\\n")
""")

HOLD_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    from shoefix_tasks.store import lease, ledger
    lease.Lease(ledger.engine_for(sys.argv[1]), "race", "doomed", ttl_s=float(sys.argv[2])).acquire()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def ledger_url(kind: str, request, tmp_path) -> str:
    return request.getfixturevalue("postgres_url") if kind == "postgres" else f"sqlite:///{tmp_path}/ledger.db"


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_lease_excludes_processes_and_survives_a_crashed_holder(kind, request, tmp_path):
    from shoefix_tasks.store import lease, ledger
    url = ledger_url(kind, request, tmp_path)
    engine = ledger.engine_for(url)
    counter, events = tmp_path / "counter", tmp_path / "events.jsonl"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, f"p{i}", "8", str(counter), str(events)],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for e in errs]
    assert int(counter.read_text()) == 24  # no lost update: no two critical sections overlapped
    spans = sorted(json.loads(line)[1:] for line in events.read_text().splitlines())
    assert all(a_out <= b_in for (_, a_out), (b_in, _) in zip(spans, spans[1:], strict=False))

    # a holder killed with SIGKILL blocks the others for at most its lease
    dead = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, url, "2"], cwd=ROOT, capture_output=True)
    assert dead.returncode == -signal.SIGKILL
    probe = lease.Lease(engine, "race", "probe", ttl_s=2, wait_s=0.2)
    assert probe.holder_now() == "doomed"
    with pytest.raises(lease.LeaseTimeout):
        probe.acquire()
    held = lease.Lease(engine, "race", "next", ttl_s=1, wait_s=30, poll_s=0.05).acquire()
    assert held.waited_s <= 2.5

    # a holder that stalls past its lease loses it, and finds out before its irreversible step
    held._stop.set()  # its heartbeat stops, as in a frozen process
    held._thread.join()
    time.sleep(1.2)
    with lease.Lease(engine, "race", "taker", ttl_s=5, wait_s=5):
        with pytest.raises(lease.LeaseLost):
            held.check()
    assert lease.Lease(engine, "race", "probe").holder_now() is None  # released cleanly


RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from shoefix_tasks import pipeline
    from shoefix_tasks.config import Settings
    from shoefix_tasks.registry import versions as registry
    actor, recipe, trained, barrier = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
    behind = sys.argv[5] if len(sys.argv) > 5 else ""
    s = Settings.from_env()
    ref = pipeline.evaluate_adapter(f"race-{actor}", recipe, trained, settings=s)
    (barrier / actor).touch()
    while len(list(barrier.iterdir())) < 2:   # both evaluated against the same (no) champion
        time.sleep(0.05)
    while behind and not (registry.promotion_lock(s, "probe").holder_now() or "").startswith(behind):
        time.sleep(0.02)                      # arrive while the other run holds the lease
    out = pipeline.gate_and_promote(f"race-{actor}", recipe, trained, ref, actor=actor, settings=s)
    print("RESULT " + json.dumps(out))
""")


def mean_composite(side: dict) -> float:
    return side["summary"]["composite"]


@pytest.mark.integration
@pytest.mark.slow
def test_two_runs_racing_to_promote_leave_one_champion_the_better(http_env, mlflow_http, tiny_recipe,  # noqa: F811
                                                                  tmp_path, monkeypatch):
    from shoefix_tasks import pipeline
    from shoefix_tasks.config import load_recipe
    from shoefix_tasks.evaluation.evaluate import evaluate
    from shoefix_tasks.records import load_eval_set, read_jsonl, write_jsonl
    from shoefix_tasks.registry import versions as registry

    s = http_env
    # the gate promotes whoever is better on the composite (latency and guards relaxed: the tiny
    # random model's timings on a shared 2-core box would otherwise decide)
    # (a test-only policy, SHOEFIX_POLICY, inherited by the racing subprocesses)
    policy = write_policy(tmp_path / "race-policy.yaml", [tiny_recipe.parent],
                          gate={"min_effect": 0.0, "confidence": 0.51, "max_latency_ratio": 100.0,
                                "guard_tolerance": 100.0, "key_data_margin": 100.0})
    monkeypatch.setenv("SHOEFIX_POLICY", str(policy))
    recipe = "tiny"

    (Path(s.inbox) / "a.jsonl").write_bytes((FIXTURES / "corpus_small.jsonl").read_bytes())
    pipeline.collect_qa("intake", s)
    snapshot = pipeline.validate_qa("intake", 1.0, s)["snapshot_path"]
    # A tiny random model never learns to answer; the strong candidate is made to know the answers
    # (trained on the fixture holdout itself, a test fixture only: intake would quarantine it), so
    # the scorer has something real to rank. The weak one learns from the corpus for one epoch.
    knows = write_jsonl(tmp_path / "knows-the-answers.jsonl", read_jsonl(FIXTURES / "corpus_small.jsonl")
                        + 6 * [r for kind in ("holdout", "guard") for r in load_eval_set(s.data_dir, kind)])
    # (no checkpoints: 330 steps would write 165 of them, and saving one changes nothing trained)
    strong = pipeline.train_adapter("train-weekly", recipe, str(knows), ["train.num_train_epochs=30",
                                                                         "train.learning_rate=0.003",
                                                                         "train.save_steps=1000"], settings=s)
    weak = pipeline.train_adapter("train-urgent", recipe, snapshot, ["train.num_train_epochs=1",
                                                                     "train.learning_rate=0.0005"], settings=s)

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # the urgent run reaches the gate while the weekly run holds the lease: it must wait, then find
    # the champion moved under it (both were scored against the base)
    procs = {actor: subprocess.Popen([sys.executable, "-c", RACER, actor, recipe, json.dumps(trained), str(barrier),
                                      behind], env=env_with(s), cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
             for actor, trained, behind in (("weekly", strong, ""), ("urgent", weak, "weekly"))}
    results = {}
    for actor, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        results[actor] = json.loads(out.split("RESULT ", 1)[1])

    print("RACE", json.dumps({a: {k: r[k] for k in ("version", "decision", "challenged", "reevaluated_against",
                                                    "lock_waited_s")} for a, r in results.items()}))
    # serialized: the urgent run waited for the lease, found the champion moved, and compared again
    first, second = "weekly", "urgent"
    assert results[first]["reevaluated_against"] is None
    assert results[second]["lock_waited_s"] > 0
    direct = direct_client(mlflow_http)
    versions = {int(v.version): v.run_id for v in direct.search_model_versions("name='shoefix-expert'")}
    assert sorted(versions.values()) == sorted([strong["run_id"], weak["run_id"]])  # one version per run
    assert results[first]["decision"] == "promote"  # the strong candidate beats the base
    assert results[second]["reevaluated_against"] == results[first]["version"]
    assert results[second]["challenged"] == f"v{results[first]['version']}"

    # exactly one champion, and it is the better candidate by a head-to-head the test runs itself
    champ = direct.get_model_version_by_alias("shoefix-expert", "champion")
    rec = load_recipe(recipe)
    truth = evaluate(s, rec, "truth", Path(weak["adapter_dir"]), Path(strong["adapter_dir"]), "strong",
                     weak["run_id"])
    head = json.loads(Path(truth["evaluation_path"]).read_text())
    better = strong if mean_composite(head["champion"]) > mean_composite(head["challenger"]) else weak
    assert mean_composite(head["champion"]) != mean_composite(head["challenger"]), "fixture: candidates tie"
    assert champ.run_id == better["run_id"], (results, mean_composite(head["champion"]),
                                              mean_composite(head["challenger"]))
    history = registry.champion_history(s)
    assert history[-1]["version"] == int(champ.version)
    assert len(history) == sum(r["decision"] == "promote" for r in results.values())


@pytest.mark.integration
def test_gate_evaluates_again_when_the_champion_moved_after_evaluation(shoefix_env, tiny_recipe, lenient_policy,
                                                                       tmp_path):
    """The deterministic half of the race: whichever way two runs interleave, the one that gets the
    lease second must be compared with the champion of *now*, not the one it was scored against."""
    import mlflow

    from shoefix_tasks import pipeline
    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking
    from tests.reliability.test_registry_faults import make_adapter, register, training_run

    s, recipe = shoefix_env, "tiny"
    tracking.configure(s)
    base = Path(yaml.safe_load(tiny_recipe.read_text())["model"]["base_model"])
    late = training_run(s, "late", make_adapter(base, s, tmp_path / "late", seed=2))
    ref = pipeline.evaluate_adapter("late", recipe, late, settings=s)
    assert ref["champion_version"] is None  # scored against the base model

    # meanwhile another run promotes v1
    v1 = int(register(s, base, training_run(s, "other", make_adapter(base, s, tmp_path / "other", seed=1))).version)
    with registry.promotion_lock(s, "other") as lease:
        registry.set_champion(s, v1, "other run", "other", lease=lease)

    out = pipeline.gate_and_promote("late", recipe, late, ref, actor="late", settings=s)
    assert out["reevaluated_against"] == v1 and out["challenged"] == f"v{v1}"
    version = mlflow.MlflowClient().get_model_version("shoefix-expert", str(out["version"]))
    assert version.tags["challenged"] == f"v{v1}" and version.tags["evaluation_run"] != ref["eval_run_id"]
    history = registry.champion_history(s)
    assert history[-1]["version"] == out["champion"]
    if out["decision"] == "promote":
        assert history[-1]["previous_version"] == v1

    again = pipeline.gate_and_promote("late", recipe, late, ref, actor="late", settings=s)  # the task's retry
    assert (again["version"], again["decision"], again["champion"]) == (out["version"], out["decision"],
                                                                        out["champion"])
    exp = mlflow.MlflowClient().get_experiment_by_name("shoefix").experiment_id
    reevals = mlflow.MlflowClient().search_runs([exp], f"tags.`shoefix.run_key` = 'late.vs-v{v1}'")
    assert len(reevals) == 1  # the retry reused the re-evaluation
    assert len(registry.champion_history(s)) == len(history)
