"""End to end on a tiny random model, against temporary Airflow (SQLite) and MLflow (SQLite)
stores: first `airflow dags test shoefix_urgent_update` with a reason (the same task graph as the
weekly DAG), whose reason must reach the version's tags, the champion history, the promotion
notification (local Slack webhook and SMTP sinks) and the ShoeFix page's champion card; then
`airflow dags test shoefix_weekly_retrain` with nothing new; then again with more data, where
version 2 must be evaluated against version 1."""

from __future__ import annotations

import html
import importlib.util
import json
import shutil
import subprocess

import pytest

from tests.conftest import FIXTURES, ROOT, airflow_env, write_policy
from tests.dags.test_notifications import SmtpSink, Webhook, connections, endpoints, smtp_text  # noqa: F401


def airflow(env, *args, timeout=900):
    proc = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    out = proc.stdout + proc.stderr
    # the interesting part of a failed run is its errors, not its progress bars
    errors = "\n".join(ln for ln in out.splitlines() if "error" in ln.lower() or "Traceback" in ln or "raise" in ln)
    assert proc.returncode == 0, errors[-6000:] or out[-4000:]
    return out


def render_page(settings) -> str:
    """The ShoeFix page as the api-server renders it (plugins/shoefix_page.py), in this process."""
    spec = importlib.util.spec_from_file_location("shoefix_page_e2e", ROOT / "plugins" / "shoefix_page.py")
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    return page.render(settings)


@pytest.mark.slow
def test_urgent_then_weekly_dag_end_to_end(shoefix_env, tiny_recipe, lenient_policy, airflow_home,
                                           endpoints, tmp_path):  # noqa: F811 - the imported fixture
    from pathlib import Path

    import mlflow
    import yaml
    from safetensors.torch import load_file

    from shoefix_tasks.model.base import compute_identity
    from shoefix_tasks.registry import versions as registry

    s = shoefix_env
    base_dir = Path(yaml.safe_load(tiny_recipe.read_text())["model"]["base_model"])
    base_before = compute_identity(base_dir, "tiny")["sha256"]
    # a lenient gate (test-only policy, SHOEFIX_POLICY) makes the first challenger the champion, so
    # the third run meets a real one; the trigger names the recipe, never a path
    env = airflow_env(s, airflow_home)  # its metadata DB already migrated
    conf = json.dumps({"recipe": "tiny"})
    shutil.copyfile(FIXTURES / "corpus_small.jsonl", s.home / "inbox" / "week1.jsonl")
    # the first run is an urgent update with a reason (markup in it: it must stay text on the page),
    # with the Slack and SMTP connections pointing at local sinks
    reason = "v0 tells people to dry boots <b>on radiators</b> & near heaters"
    log1 = airflow({**env, **connections(*endpoints)}, "dags", "test", "shoefix_urgent_update", "-c",
                   json.dumps({"reason": reason, "recipe": "tiny"}))
    assert "state=success" in log1

    client = mlflow.MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)
    versions = client.search_model_versions("name='shoefix-expert'")
    assert [int(v.version) for v in versions] == [1]
    v1 = versions[0]
    assert v1.tags["challenged"] == "base" and v1.tags["gate_decision"] == "promote"
    for tag in ("training_run", "corpus_snapshot", "holdout_hash", "base_model", "recipe"):
        assert v1.tags[tag]
    # the recipe the run resolved once, by content: the version and its training run name the same one,
    # and it is the tiny recipe as written (nothing edited it on the way)
    from shoefix_tasks.config import load_recipe
    expected = load_recipe(str(tiny_recipe)).digest
    trained_with = client.get_run(v1.tags["training_run"]).data.tags["shoefix.recipe_sha256"]
    assert v1.tags["recipe_sha256"] == trained_with == expected
    assert "| content completeness" in v1.description
    assert int(client.get_model_version_by_alias("shoefix-expert", "champion").version) == 1
    adapter = client.download_artifacts(v1.run_id, "adapter", str(tmp_path / "dl"))
    weights = load_file(f"{adapter}/adapter_model.safetensors")
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # LoRA weights changed
    assert compute_identity(base_dir, "tiny")["sha256"] == base_before  # base weights did not
    manifest = json.loads((Path(adapter) / "shoefix_manifest.json").read_text())
    assert manifest["base"]["sha256"] == base_before

    # the urgent run's reason, and who triggered it (`airflow dags test` runs as user dag_test):
    # (a) on the registry version
    assert (v1.tags["trigger_reason"], v1.tags["triggered_by"]) == (reason, "dag_test")
    # (b) in the champion history
    [promoted] = registry.champion_history(s)
    assert promoted["version"] == 1 and promoted["action"] == "promote"
    assert f"triggered because: {reason}" in promoted["reason"] and "triggered by dag_test" in promoted["actor"]
    assert promoted["actor"].startswith("shoefix_urgent_update (run manual__")
    # (c) in the promotion notification, through Slack and SMTP (nothing else was announced)
    [(_, slack)] = Webhook.received
    assert "shoefix-expert v1 is the new champion" in slack["text"]
    assert f"Triggered by dag_test because: {reason}" in slack["text"]
    [mail] = SmtpSink.messages
    assert f"Triggered by dag_test because: {reason}" in smtp_text(mail)
    # (d) on the ShoeFix page's champion card, escaped
    page = render_page(s)
    card = page.split("<h2>Champion</h2>", 1)[1].split("<h2>Scorecard of v1", 1)[0]
    assert '<div class="big">v1</div>' in card
    assert f"triggered because: {html.escape(reason)} (by dag_test)" in card
    assert "<b>on radiators</b>" not in page  # text, never markup

    # nothing new: quick, no training, no new version
    log2 = airflow(env, "dags", "test", "shoefix_weekly_retrain", "-c", conf)
    assert "state=success" in log2 and "nothing new" in log2
    assert len(client.search_model_versions("name='shoefix-expert'")) == 1

    # more data: version 2 is evaluated against version 1, not against the base, and judged by the
    # production gate (the built-in policy: only the tiny recipe's folder added), on real model output
    production = write_policy(tmp_path / "policy" / "production.yaml", [tiny_recipe.parent], base=None)
    shutil.copyfile(FIXTURES / "corpus_more.jsonl", s.home / "inbox" / "week3.jsonl")
    airflow({**env, "SHOEFIX_POLICY": str(production)}, "dags", "test", "shoefix_weekly_retrain", "-c", conf)
    v2 = client.get_model_version("shoefix-expert", "2")
    assert v2.tags["challenged"] == "v1"
    assert "trigger_reason" not in v2.tags  # the weekly DAG takes no reason
    assert int(client.get_model_version_by_alias("shoefix-expert", "challenger").version) == 2
    evaluation = json.loads(Path(client.download_artifacts(v2.tags["evaluation_run"], "evaluation.json",
                                                           str(tmp_path / "ev"))).read_text())
    assert evaluation["policy"]["source"] == str(production.resolve())
    assert v2.tags["gate_decision"] == independent_decision(evaluation, s.data_dir)


def independent_decision(evaluation: dict, data_dir) -> str:
    """The production gate's verdict recomputed from the evaluation's raw answers, outside the gate
    module: every score re-derived from the answer text, the paired bootstrap with numpy, the
    forbidden claims checked again, the thresholds as the operator's documentation states them."""
    import numpy as np

    from shoefix_tasks.evaluation.claims import forbidden, load_claims
    from shoefix_tasks.evaluation.metrics import Context, fixed_answers, score_answer
    from shoefix_tasks.records import load_eval_set

    items = {it["id"]: it for kind in ("holdout", "guard") for it in load_eval_set(data_dir, kind)}
    ctx, claims = Context.from_data(data_dir), load_claims(data_dir)
    rescored = {}
    for side in ("champion", "challenger"):
        scores = evaluation[side]["scores"]
        its = [items[sc["id"]] for sc in scores]
        fixed = fixed_answers(its, [sc["answer"] for sc in scores])
        rescored[side] = {sc["id"]: score_answer(it, sc["answer"], ctx, fixed=i in fixed)
                          for i, (sc, it) in enumerate(zip(scores, its, strict=True))}
        for sc in scores:  # the stored scores are what the answers score
            assert rescored[side][sc["id"]].composite == sc["composite"]
    guard = set(evaluation["guard_ids"])
    ids = sorted(set(rescored["challenger"]) - guard)
    diff = np.array([rescored["challenger"][i].composite - rescored["champion"][i].composite for i in ids])
    kd = np.array([rescored["challenger"][i].key_data_accuracy - rescored["champion"][i].key_data_accuracy
                   for i in ids])
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(ids), size=(4000, len(ids)))
    lo, kd_lo = np.percentile(diff[draws].mean(axis=1), 2.5), np.percentile(kd[draws].mean(axis=1), 2.5)
    said = [f for sc in evaluation["challenger"]["scores"]
            for f in forbidden(sc["answer"], items[sc["id"]]["lang"], claims)]
    guard_drop = any(rescored["challenger"][g].composite < rescored["champion"][g].composite - 1.0 for g in guard)
    # min effect 0.1 on the composite, no forbidden claim, guard within 1.0, key data within -0.5; the
    # latency bound does not apply (same base, dtype, engine: evaluation["latency"]["compared"] is false)
    assert evaluation["latency"]["compared"] is False
    promote = diff.mean() != 0 and lo > 0.1 and not said and not guard_drop and kd_lo > -0.5
    return "promote" if promote else "keep_champion"
