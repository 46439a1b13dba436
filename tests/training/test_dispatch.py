"""Dispatch settings, trainer launch commands, and the trainer pod spec (rendered, no cluster)."""

from __future__ import annotations

import json
import sys

import pytest

from shoefix_tasks.training.dispatch import (
    XCOM_RESULT,
    DispatchConfig,
    detect_gpus,
    kubernetes_pod_kwargs,
    launch_prefix,
    pod_exit_code,
    resolve_processes,
    trainer_args,
)

K8S_ENV = {
    "SHOEFIX_TRAIN_DISPATCH": "kubernetes",
    "SHOEFIX_HOME": "/opt/shoefix-state",
    "SHOEFIX_K8S_IMAGE": "registry.example.com/shoefix/trainer:1.2.3",
    "SHOEFIX_K8S_NAMESPACE": "ml",
    "SHOEFIX_K8S_PVC": "shoefix-state-rwx",
    "SHOEFIX_K8S_SECRET": "shoefix-trainer-env",
    "SHOEFIX_K8S_NODE_SELECTOR": json.dumps({"nvidia.com/gpu.product": "NVIDIA-H200"}),
    "SHOEFIX_K8S_TOLERATIONS": json.dumps([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    "MLFLOW_TRACKING_URI": "http://mlflow.ml.svc:5000",
    # secrets the Airflow side has in its environment: they must never be copied into the pod spec
    "MLFLOW_TRACKING_PASSWORD": "pw-Zq81-never-in-spec",
    "SHOEFIX_LEDGER_URL": "postgresql+psycopg://shoefix:ledger-pw-never-in-spec@postgres/ledger",
}


def test_settings_from_env():
    assert DispatchConfig.from_env({}).mode == "local"
    assert DispatchConfig.from_env({}).task_routing() == {"pool": "gpu"}
    celery = DispatchConfig.from_env({"SHOEFIX_TRAIN_DISPATCH": "celery"})
    assert celery.task_routing() == {"queue": "gpu", "pool": "gpu"}
    k8s = DispatchConfig.from_env(K8S_ENV)
    assert k8s.task_routing() == {"pool": "gpu"}
    assert k8s.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H200"} and k8s.tolerations[0]["operator"] == "Exists"
    assert k8s.state_path == "/opt/shoefix-state"  # the workers' SHOEFIX_HOME: paths mean the same file
    with pytest.raises(ValueError, match="SHOEFIX_TRAIN_DISPATCH"):
        DispatchConfig.from_env({"SHOEFIX_TRAIN_DISPATCH": "slurm"})
    with pytest.raises(ValueError, match="SHOEFIX_K8S_NODE_SELECTOR must be JSON"):
        DispatchConfig.from_env({"SHOEFIX_K8S_NODE_SELECTOR": "gpu=h200"})
    with pytest.raises(ValueError, match="SHOEFIX_TRAIN_PROCESSES"):
        DispatchConfig.from_env({"SHOEFIX_TRAIN_PROCESSES": "0"})


def test_launch_commands():
    assert launch_prefix(1, python="py") == ["py", "-m", "shoefix_tasks.train"]
    ddp = launch_prefix(4, python="py")
    assert ddp[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert ddp[ddp.index("--num_processes") + 1] == "4" and ddp[-2:] == ["-m", "shoefix_tasks.train"]
    assert launch_prefix(1)[0] == sys.executable  # the worker's own environment
    args = trainer_args("default", "/s/snap.jsonl", None, "manual__1", ["train.max_steps=3"])
    assert args == ["--recipe", "default", "--snapshot", "/s/snap.jsonl", "--run-key", "manual__1",
                    "--set", "train.max_steps=3"]
    assert "--output-dir" in trainer_args("d", "s", "/o", "r", [])


def test_process_count_detection():
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert resolve_processes("auto", gpus=8) == 8
    assert resolve_processes("auto", gpus=0) == 1  # no GPU: one process
    assert resolve_processes("2", gpus=8) == 2


def _render(op, validated: dict, params: dict | None = None):
    """Render the operator's templates as a run would: run_id, the validate_qa XCom, and the values
    collect_qa validated (XCom `trigger`); `params` (the raw conf) must never reach the pod."""

    class TI:  # only what the templates read
        def xcom_pull(self, task_ids, key="return_value"):
            if (task_ids, key) == ("collect_qa", "trigger"):
                return validated
            assert (task_ids, key) == ("validate_qa", "return_value")
            return {"snapshot_path": "/opt/shoefix-state/snapshots/abc123.jsonl"}

    op.render_template_fields({"params": params or {}, "run_id": "scheduled__2026-11-30T19:00:00+00:00", "ti": TI()})


@pytest.fixture()
def k8s_env(monkeypatch):
    for k, v in K8S_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes"}))


def _trainer_pod_op():
    import retrain_graph

    return retrain_graph._trainer_pod(DispatchConfig.from_env())


def test_trainer_pod_spec(k8s_env):
    op = _trainer_pod_op()
    assert op.task_id == "train_adapter" and op.pool == "gpu"
    assert op.on_finish_action.value == "delete_pod" and op.reattach_on_restart
    resolved = "/opt/shoefix-state/runs/scheduled__2026-11-30T19_00_00_00_00/recipe.yaml"
    _render(op, {"recipe": "qwen2.5-1.5b-gpu", "overrides": ["train.learning_rate=0.0001"],
                 "recipe_file": resolved, "recipe_sha256": "f" * 64},
            params={"recipe": "/tmp/evil.yaml", "overrides": {"gate.min_effect": -100}})
    pod = op.build_pod_request_obj(dry_run=True)
    spec = pod.spec
    base = next(c for c in spec.containers if c.name == "base")
    assert pod.metadata.namespace == "ml"
    assert base.image == "registry.example.com/shoefix/trainer:1.2.3"
    assert base.command == ["python", "-m", "shoefix_tasks.train"]
    # the run's resolved recipe file (name + validated overrides, hashed once by collect_qa), never the raw conf
    assert base.args == ["--recipe", resolved, "--snapshot", "/opt/shoefix-state/snapshots/abc123.jsonl",
                         "--run-key", "scheduled__2026-11-30T19:00:00+00:00", "--result-file", XCOM_RESULT]
    assert base.resources.limits["nvidia.com/gpu"] == "1"
    assert spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert [(t.key, t.operator, t.effect) for t in spec.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    claims = {v.name: v.persistent_volume_claim.claim_name for v in spec.volumes if v.persistent_volume_claim}
    assert claims == {"shoefix-state": "shoefix-state-rwx"}
    mounts = {m.name: m.mount_path for m in base.volume_mounts}
    assert mounts["shoefix-state"] == "/opt/shoefix-state" and mounts["dshm"] == "/dev/shm"
    assert any(c.name == "airflow-xcom-sidecar" for c in spec.containers)  # the result comes back through XCom
    assert spec.restart_policy == "Never" and spec.termination_grace_period_seconds == 120
    assert spec.active_deadline_seconds == 6 * 3600 + 120
    env = {e.name: e.value for e in base.env}
    assert env["SHOEFIX_HOME"] == "/opt/shoefix-state" and env["SHOEFIX_REQUIRE_GPU"] == "1"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.ml.svc:5000"
    assert [e.secret_ref.name for e in base.env_from] == ["shoefix-trainer-env"]  # secrets: from a k8s Secret
    dumped = json.dumps(pod.to_dict(), default=str)
    assert "never-in-spec" not in dumped and "MLFLOW_TRACKING_PASSWORD" not in dumped
    assert "SHOEFIX_LEDGER_URL" not in dumped


def test_multi_gpu_pod_runs_accelerate(k8s_env, monkeypatch):
    monkeypatch.setenv("SHOEFIX_K8S_GPUS", "4")
    op = _trainer_pod_op()
    _render(op, {"recipe": "default", "overrides": []})
    base = next(c for c in op.build_pod_request_obj(dry_run=True).spec.containers if c.name == "base")
    assert base.command[:3] == ["python", "-m", "accelerate.commands.launch"]
    assert base.command[base.command.index("--num_processes") + 1] == "4"
    assert base.resources.limits["nvidia.com/gpu"] == "4"


def test_credentials_never_go_into_plain_pod_env():
    cfg = DispatchConfig.from_env(K8S_ENV)
    with pytest.raises(ValueError, match="credential"):
        kubernetes_pod_kwargs(cfg, [], {**K8S_ENV, "MLFLOW_TRACKING_URI": "http://admin:pw@mlflow:5000"})


def _finished_pod(exit_code: int):
    from kubernetes.client import models as k8s

    terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code)
    status = k8s.V1ContainerStatus(name="base", image="i", image_id="", ready=False, restart_count=0,
                                   state=k8s.V1ContainerState(terminated=terminated))
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="shoefix-train-x", namespace="ml"),
                     status=k8s.V1PodStatus(phase="Failed", container_statuses=[status]))


def test_pod_exit_code():
    assert pod_exit_code(_finished_pod(78)) == 78
    assert pod_exit_code(_finished_pod(1), container="other") is None
    assert pod_exit_code(None) is None


def test_failed_preflight_in_a_pod_fails_without_retry(k8s_env):
    """The operator's cleanup turns the trainer's no-retry exit codes into AirflowFailException."""
    from airflow.sdk.exceptions import AirflowFailException

    op = _trainer_pod_op()
    op.on_finish_action = type(op.on_finish_action)("keep_pod")  # nothing to delete: there is no cluster
    op.log_events_on_failure = False
    for code, expected in [(78, AirflowFailException), (79, AirflowFailException), (1, Exception)]:
        pod = _finished_pod(code)
        with pytest.raises(expected) as info:
            op.cleanup(pod, pod)
        assert (info.type is AirflowFailException) == (code in (78, 79))
