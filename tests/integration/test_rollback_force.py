"""A rollback onto a version the gate refused is an override of the gate: it needs an explicit force
and a reason, and the champion history records it as `rollback-forced`. Through the registry, the
`shoefix rollback` CLI and the `shoefix_rollback` DAG (`airflow dags test`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shoefix_tasks.registry import versions as registry
from shoefix_tasks.store import tracking
from tests.conftest import ROOT, airflow_env, env_with
from tests.reliability.test_registry_faults import make_adapter, register, training_run

MODEL = "shoefix-expert"


def versions(s, base, tmp_path, decisions: list[str | None]) -> list[int]:
    """One registered version per entry, tagged with that gate decision (None: no tag)."""
    import mlflow

    out = []
    for i, decision in enumerate(decisions, start=1):
        v = int(register(s, base, training_run(s, f"run-{i}", make_adapter(base, s, tmp_path / f"a{i}", seed=i))).version)
        if decision is not None:
            mlflow.MlflowClient().set_model_version_tag(MODEL, str(v), "gate_decision", decision)
        out.append(v)
    return out


def champion() -> int:
    return int(registry.version_by_alias(registry.CHAMPION).version)


def cli(s, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoefix_tasks.ops.cli", "rollback", *args], env=env_with(s),
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.integration
def test_rollback_onto_a_refused_version_needs_force_and_is_recorded(shoefix_env, tiny_model, tmp_path):
    s = shoefix_env
    tracking.configure(s)
    v1, v2, v3, v4 = versions(s, tiny_model, tmp_path, ["promote", "keep_champion", "promote", None])
    for v in (v1, v3):
        with registry.promotion_lock(s, "test") as lease:
            registry.set_champion(s, v, "gate passed", "test", lease=lease)
    before = registry.champion_history(s)

    for target, decision in ((v2, "keep_champion"), (v4, "none")):
        with pytest.raises(registry.RollbackRefused, match=f"not promoted by the gate \\(gate_decision: {decision}\\)"):
            registry.rollback(s, target, "v3 regressed on guard questions", "test")
    with pytest.raises(registry.RollbackRefused, match="needs a reason"):
        registry.rollback(s, v1, "   ", "test", force=True)
    assert champion() == v3 and registry.champion_history(s) == before  # nothing moved, nothing recorded

    # the CLI: refused without --force (exit 2, says how), done with it, and recorded as forced
    out = cli(s, "--to", str(v2), "--reason", "v3 regressed on guard questions")
    assert out.returncode == 2 and "not promoted by the gate" in out.stderr and "--force" in out.stderr, out.stderr
    assert champion() == v3
    out = cli(s, "--to", str(v2), "--reason", "v3 regressed on guard questions; v2 is safer", "--force")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["forced"] is True
    assert champion() == v2
    last = registry.champion_history(s)[-1]
    assert (last["version"], last["previous_version"], last["action"], last["actor"]) == (v2, v3, "rollback-forced",
                                                                                         "cli")
    assert last["reason"] == "v3 regressed on guard questions; v2 is safer"

    # onto a version the gate promoted: a plain rollback, force or not
    out = registry.rollback(s, v1, "back to the first promoted version", "test", force=True)
    assert out["forced"] is False and registry.champion_history(s)[-1]["action"] == "rollback"
    assert champion() == v1


@pytest.mark.integration
@pytest.mark.slow
def test_rollback_dag_force_param(shoefix_env, tiny_model, tmp_path, airflow_home):
    s = shoefix_env
    tracking.configure(s)
    v1, v2 = versions(s, tiny_model, tmp_path, ["promote", "rejected"])
    with registry.promotion_lock(s, "test") as lease:
        registry.set_champion(s, v1, "gate passed", "test", lease=lease)
    env = airflow_env(s, airflow_home)  # its DB already migrated

    def dags_test(conf: dict) -> str:
        proc = subprocess.run(["airflow", "dags", "test", "shoefix_rollback", "-c", json.dumps(conf)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        return proc.stdout + proc.stderr

    reason = "v1 misreads drying temperatures"
    out = dags_test({"version": v2, "reason": reason})
    assert "not promoted by the gate (gate_decision: rejected)" in out and "new_state=failed" in out, out[-4000:]
    assert "up_for_retry" not in out.lower() and champion() == v1
    out = dags_test({"version": v2, "reason": reason, "force": True})
    assert "state=success" in out, out[-4000:]
    last = registry.champion_history(s)[-1]
    assert champion() == v2 and (last["action"], last["reason"]) == ("rollback-forced", reason)
    # who: the DAG and its run, and who triggered it (`airflow dags test` runs as user dag_test)
    assert last["actor"].startswith("shoefix_rollback (run manual__") and last["actor"].endswith(
        ", triggered by dag_test)"), last["actor"]
