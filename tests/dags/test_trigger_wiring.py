"""The retraining tasks use the values collect_qa validated, never the raw params: the recipe is
resolved once (name + validated overrides -> one hashed file every later task uses), `evaluation:
quick` becomes `quick=True` for evaluation and gate (not a recipe override), the trigger's reason and
user reach the gate, and a refused conf fails the first task without retries.

Real DAG task functions; only the Airflow task context and the pipeline stages (which train and
evaluate for real in tests/integration) are stand-ins, so this runs in a second."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

RAW = {"reason": "v3 gives wrong drying temperatures", "recipe": "seed", "evaluation": "quick", "inbox": "",
       "files": ["urgent/fix.jsonl"], "overrides": {"train.learning_rate": 1e-4}}


@pytest.fixture()
def graph(shoefix_env, monkeypatch):
    import retrain_graph
    import trigger_conf

    monkeypatch.delenv("SHOEFIX_POLICY", raising=False)
    xcom: dict = {}
    ti = SimpleNamespace(xcom_push=lambda key, value: xcom.__setitem__(key, value),
                         xcom_pull=lambda task_ids, key: xcom[key] if task_ids == "collect_qa" else None)
    ctx = {"dag": SimpleNamespace(dag_id="shoefix_urgent_update"), "run_id": "manual__t", "params": dict(RAW),
           "ti": ti, "outlet_events": {}, "dag_run": SimpleNamespace(triggering_user_name="ops-alice")}
    for module in (retrain_graph, trigger_conf):
        monkeypatch.setattr(module, "get_current_context", lambda: ctx)
    monkeypatch.setattr(retrain_graph, "_judge_config", lambda: None)
    return SimpleNamespace(module=retrain_graph, ctx=ctx, xcom=xcom)


def test_later_tasks_use_the_validated_values(graph, monkeypatch):
    from shoefix_tasks import pipeline
    calls = {}

    def stage(name, result):
        def run(*args, **kwargs):
            calls[name] = (args, kwargs)
            return result
        monkeypatch.setattr(pipeline, name, run)

    stage("collect_qa", {"collected": 0})
    stage("train_adapter", {"run_id": "t"})
    stage("evaluate_adapter", {"eval_run_id": "e"})
    stage("gate_and_promote", {"decision": "keep_champion"})
    rg = graph.module
    assert rg.collect_qa.function() == {}  # nothing new (stand-in), but the conf was checked and kept
    assert calls["collect_qa"][1] == {"inbox": None, "files": ["urgent/fix.jsonl"]}
    assert graph.xcom["trigger"]["quick"] is True

    from shoefix_tasks.config import load_recipe

    resolved = graph.xcom["trigger"]["recipe_file"]
    assert load_recipe(resolved).train.learning_rate == 1e-4 and load_recipe(resolved).name == "seed"
    graph.ctx["params"] = {"recipe": "/tmp/evil.yaml", "overrides": {"gate.min_effect": -100}}  # never read again
    rg._train_adapter_task.function({"snapshot_path": "/s.jsonl"})
    rg.evaluate_adapter.function({"run_id": "t"})
    rg.gate_and_promote.function({"run_id": "t"}, {"eval_run_id": "e"})
    assert calls["train_adapter"][0] == ("manual__t", resolved, "/s.jsonl")
    for name in ("evaluate_adapter", "gate_and_promote"):
        args, kwargs = calls[name]
        assert args[1] == resolved, name
        assert kwargs["quick"] is True and not any("eval." in str(a) for a in args), name
    assert calls["gate_and_promote"][1]["trigger"] == {"reason": RAW["reason"], "triggered_by": "ops-alice",
                                                       "dag_id": "shoefix_urgent_update"}


def test_the_resolved_recipe_is_refused_once_edited(graph, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from shoefix_tasks import pipeline

    monkeypatch.setattr(pipeline, "collect_qa", lambda *a, **k: {"collected": 0})
    graph.module.collect_qa.function()
    path = graph.xcom["trigger"]["recipe_file"]
    with open(path, "a") as fh:
        fh.write("\n# edited during the run\n")  # a comment: same content, same hash
    graph.module._recipe(graph.xcom["trigger"])
    text = open(path).read().replace("learning_rate: 0.0001", "learning_rate: 0.0002")
    open(path, "w").write(text)
    with pytest.raises(AirflowFailException, match="changed after it was resolved"):
        with graph.module.no_retry_on_permanent_errors():
            graph.module._recipe(graph.xcom["trigger"])


def test_a_refused_conf_fails_the_first_task_without_retries(graph):
    from airflow.sdk.exceptions import AirflowFailException

    graph.ctx["params"] = {**RAW, "gate": {"min_effect": -100}}
    with pytest.raises(AirflowFailException, match=r"TriggerRefused: .*\['gate'\]"):
        graph.module.collect_qa.function()
    assert "trigger" not in graph.xcom


NAMED = {"TriggerRefused", "CandidateRejected", "EvalSetChanged", "PreflightError", "TrainerUnfit",
         "QuarantineRateExceeded", "FeedbackError", "ServedArtifactMismatch", "RollbackRefused", "NoServedVersion"}


def test_one_class_says_a_retry_cannot_help():
    """Each failure a retry would only repeat derives from errors.PermanentError, and that one class is
    what the DAG tasks catch (trigger_conf.no_retry_on_permanent_errors): each becomes a failure without
    retries; anything else stays retryable. No DAG file catches a permanent error, or a class one of them
    derives from (ValueError, LookupError), by name."""
    import ast
    import importlib
    import re
    from pathlib import Path

    import trigger_conf
    from airflow.sdk.exceptions import AirflowFailException

    import shoefix_tasks
    from shoefix_tasks.errors import PermanentError

    pkg = Path(shoefix_tasks.__file__).parent
    for path in pkg.rglob("*.py"):  # every module that mentions the class, so that all subclasses exist
        if re.search(r"^class \w+\(.*PermanentError", path.read_text(), re.M):
            importlib.import_module(".".join(("shoefix_tasks", *path.relative_to(pkg).with_suffix("").parts)))
    classes, todo = set(), [PermanentError]
    while todo:  # subclasses of subclasses too
        for sub in todo.pop().__subclasses__():
            classes.add(sub)
            todo.append(sub)
    assert NAMED <= {c.__name__ for c in classes}, NAMED - {c.__name__ for c in classes}
    for cls in classes:
        with pytest.raises(AirflowFailException, match=f"^{cls.__name__}: why"):
            with trigger_conf.no_retry_on_permanent_errors():
                raise cls("why")
    for err in (RuntimeError("flaky"), OSError("disk"), ConnectionError("mlflow down")):
        with pytest.raises(type(err)):
            with trigger_conf.no_retry_on_permanent_errors():
                raise err

    forbidden = {k.__name__ for c in classes for k in c.__mro__} - {"object", "BaseException", "Exception"}
    caught = set()
    for path in Path(trigger_conf.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                caught |= {(path.name, getattr(n, "id", getattr(n, "attr", ""))) for n in types}
    assert {c for c in caught if c[1] in forbidden} == {("trigger_conf.py", "PermanentError")}, caught
