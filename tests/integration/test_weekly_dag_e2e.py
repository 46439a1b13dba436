"""End to end: `airflow dags test shoefix_weekly_retrain` on a tiny random model, against
temporary Airflow (SQLite) and MLflow (SQLite) stores; then again with nothing new; then again
with more data, where version 2 must be evaluated against version 1."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import FIXTURES, ROOT, env_with


def airflow(env, *args, timeout=900):
    proc = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    out = proc.stdout + proc.stderr
    # the interesting part of a failed run is its errors, not its progress bars
    errors = "\n".join(ln for ln in out.splitlines() if "error" in ln.lower() or "Traceback" in ln or "raise" in ln)
    assert proc.returncode == 0, errors[-6000:] or out[-4000:]
    return out


@pytest.mark.slow
def test_weekly_dag_end_to_end(shoefix_env, tiny_recipe, lenient_policy, tmp_path):
    from pathlib import Path

    import mlflow
    import yaml
    from safetensors.torch import load_file

    from shoefix_tasks.base_model import compute_identity

    s = shoefix_env
    base_dir = Path(yaml.safe_load(tiny_recipe.read_text())["model"]["base_model"])
    base_before = compute_identity(base_dir, "tiny")["sha256"]
    # a lenient gate (test-only policy, SHOEFIX_POLICY) makes the first challenger the champion, so
    # the third run meets a real one; the trigger names the recipe, never a path
    env = env_with(s, AIRFLOW_HOME=tmp_path / "airflow", AIRFLOW__CORE__DAGS_FOLDER=ROOT / "dags",
                   AIRFLOW__CORE__LOAD_EXAMPLES="False",
                   AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path}/airflow/airflow.db")
    conf = json.dumps({"recipe": "tiny"})
    airflow(env, "db", "migrate")
    shutil.copyfile(FIXTURES / "corpus_small.jsonl", s.home / "inbox" / "week1.jsonl")
    log1 = airflow(env, "dags", "test", "shoefix_weekly_retrain", "-c", conf)
    assert "state=success" in log1

    client = mlflow.MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)
    versions = client.search_model_versions("name='shoefix-expert'")
    assert [int(v.version) for v in versions] == [1]
    v1 = versions[0]
    assert v1.tags["challenged"] == "base" and v1.tags["gate_decision"] == "promote"
    for tag in ("training_run", "corpus_snapshot", "holdout_hash", "base_model", "recipe"):
        assert v1.tags[tag]
    assert "| content completeness" in v1.description
    assert int(client.get_model_version_by_alias("shoefix-expert", "champion").version) == 1
    adapter = client.download_artifacts(v1.run_id, "adapter", str(tmp_path / "dl"))
    weights = load_file(f"{adapter}/adapter_model.safetensors")
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # LoRA weights changed
    assert compute_identity(base_dir, "tiny")["sha256"] == base_before  # base weights did not
    manifest = json.loads((Path(adapter) / "shoefix_manifest.json").read_text())
    assert manifest["base"]["sha256"] == base_before

    # nothing new: quick, no training, no new version
    log2 = airflow(env, "dags", "test", "shoefix_weekly_retrain", "-c", conf)
    assert "state=success" in log2 and "nothing new" in log2
    assert len(client.search_model_versions("name='shoefix-expert'")) == 1

    # more data: version 2 is evaluated against version 1, not against the base
    shutil.copyfile(FIXTURES / "corpus_more.jsonl", s.home / "inbox" / "week3.jsonl")
    airflow(env, "dags", "test", "shoefix_weekly_retrain", "-c", conf)
    v2 = client.get_model_version("shoefix-expert", "2")
    assert v2.tags["challenged"] == "v1"
    assert int(client.get_model_version_by_alias("shoefix-expert", "challenger").version) == 2
