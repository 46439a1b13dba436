"""Where `train_adapter` runs, and how the trainer is launched there.

`SHOEFIX_TRAIN_DISPATCH` (read when the DAG is parsed, so it must be cheap) selects:

- `local` (the embedded default): the task runs the trainer CLI as a subprocess of its worker;
- `celery`: the same task, routed to Airflow queue `gpu` (Celery workers on GPU nodes);
- `kubernetes`: a `KubernetesPodOperator` runs the trainer image (docker/Dockerfile.trainer) on
  a GPU node pool; `kubernetes_pod_kwargs` builds its arguments from `SHOEFIX_K8S_*` settings.

Every mode uses pool `gpu` (one slot per GPU node: concurrent trainings never share a GPU).
More than one GPU on a node is `accelerate launch --num_processes N` of the same CLI (DDP);
N is `SHOEFIX_TRAIN_PROCESSES` (a number, or `auto`: the GPUs this node has).

Never imports airflow (the DAG wraps these values in operators) nor torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoefix_tasks.errors import PermanentError

log = logging.getLogger(__name__)
MODES = ("local", "celery", "kubernetes")
GPU_QUEUE = "gpu"
GPU_POOL = "gpu"
TRAINER_MODULE = "shoefix_tasks.train"  # the stable entry point (a shim over shoefix_tasks.training.train)
XCOM_RESULT = "/airflow/xcom/return.json"  # where KPO's xcom sidecar reads the task's result
STOP_GRACE_S = 120  # SIGTERM -> SIGKILL for a trainer we must stop: time to finish a step and checkpoint
# Plain (non-secret) settings a trainer pod gets from the Airflow side; credentials come from the
# Kubernetes Secret named by SHOEFIX_K8S_SECRET (MLFLOW_TRACKING_USERNAME/PASSWORD,
# SHOEFIX_LEDGER_URL, AWS_* for the artifact store), never from here.
POD_PLAIN_ENV = ("MLFLOW_TRACKING_URI", "SHOEFIX_ARTIFACT_ROOT", "MLFLOW_S3_ENDPOINT_URL", "SHOEFIX_TORCH_THREADS")


class TrainerUnfit(PermanentError):
    """The trainer refused this node (preflight) or ran out of memory at micro-batch 1: a retry
    on the same kind of node cannot succeed, so the task should fail without retries."""


class TrainerStopped(RuntimeError):
    """The trainer stopped on a signal after writing a checkpoint; a retry resumes from it."""


def _json_env(env: Mapping[str, str], name: str, default: Any) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{name} must be JSON, got {raw!r}") from err


@dataclass(frozen=True)
class DispatchConfig:
    """Where and how training runs; `from_env` reads it (cheaply: DAG parse time)."""

    mode: str = "local"
    processes: str = "1"  # trainer processes per node (DDP when > 1); "auto" = GPUs on the node
    image: str = "shoefix/trainer:latest"
    namespace: str = "shoefix"
    gpus: int = 1  # nvidia.com/gpu limit of a trainer pod (and its process count)
    memory: str = "64Gi"
    cpu: str = "8"
    pvc: str = "shoefix-state"  # PersistentVolumeClaim holding SHOEFIX_HOME, shared with the workers
    state_path: str = "/opt/shoefix-state"  # where it is mounted: the same path as the workers' SHOEFIX_HOME
    secret: str = "shoefix-trainer"  # Kubernetes Secret whose keys become the pod's secret env
    service_account: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    grace_period_s: int = STOP_GRACE_S  # SIGTERM -> SIGKILL in the pod: time to write a checkpoint
    timeout_s: int = 6 * 3600  # the task's execution_timeout; the pod's own deadline adds the grace

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SHOEFIX_TRAIN_DISPATCH must be one of {MODES}, got {self.mode!r}")
        if self.processes != "auto" and not (self.processes.isdigit() and int(self.processes) >= 1):
            raise ValueError(f"SHOEFIX_TRAIN_PROCESSES must be a positive number or 'auto', got {self.processes!r}")
        if self.gpus < 1:
            raise ValueError("SHOEFIX_K8S_GPUS must be >= 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DispatchConfig:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            mode=env.get("SHOEFIX_TRAIN_DISPATCH", d.mode).strip().lower() or d.mode,
            processes=env.get("SHOEFIX_TRAIN_PROCESSES", d.processes).strip().lower(),
            image=env.get("SHOEFIX_K8S_IMAGE", d.image),
            namespace=env.get("SHOEFIX_K8S_NAMESPACE", d.namespace),
            gpus=int(env.get("SHOEFIX_K8S_GPUS", d.gpus)),
            memory=env.get("SHOEFIX_K8S_MEMORY", d.memory),
            cpu=env.get("SHOEFIX_K8S_CPU", d.cpu),
            pvc=env.get("SHOEFIX_K8S_PVC", d.pvc),
            state_path=env.get("SHOEFIX_K8S_STATE_PATH", env.get("SHOEFIX_HOME", d.state_path)),
            secret=env.get("SHOEFIX_K8S_SECRET", d.secret),
            service_account=env.get("SHOEFIX_K8S_SERVICE_ACCOUNT", d.service_account),
            node_selector=_json_env(env, "SHOEFIX_K8S_NODE_SELECTOR", {}),
            tolerations=_json_env(env, "SHOEFIX_K8S_TOLERATIONS", []),
            grace_period_s=int(env.get("SHOEFIX_K8S_GRACE_PERIOD_S", d.grace_period_s)),
            timeout_s=int(env.get("SHOEFIX_TRAIN_TIMEOUT_S", d.timeout_s)),
        )

    def task_routing(self) -> dict[str, str]:
        """Operator arguments for `train_adapter`: pool `gpu` always, queue `gpu` under Celery."""
        return {"pool": GPU_POOL, **({"queue": GPU_QUEUE} if self.mode == "celery" else {})}


def detect_gpus(env: Mapping[str, str] | None = None) -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`; 0 if none."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def resolve_processes(setting: str, gpus: int | None = None) -> int:
    if setting != "auto":
        return int(setting)
    return max(1, detect_gpus() if gpus is None else gpus)


def launch_prefix(processes: int, python: str = sys.executable) -> list[str]:
    """The command that starts the trainer: the module itself, or `accelerate launch` for DDP.

    accelerate's launcher runs torchrun underneath: one process per GPU, RANK / WORLD_SIZE /
    LOCAL_RANK set for each, NCCL on GPUs (gloo where there are none).
    """
    if processes <= 1:
        return [python, "-m", TRAINER_MODULE]
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", TRAINER_MODULE]


def trainer_args(recipe: str, snapshot: str, output_dir: str | None, run_key: str,
                 overrides: list[str]) -> list[str]:
    """The trainer CLI's arguments; no `output_dir` = the CLI's default under SHOEFIX_HOME."""
    args = ["--recipe", recipe, "--snapshot", snapshot, "--run-key", run_key]
    if output_dir:
        args += ["--output-dir", output_dir]
    for o in overrides:
        args += ["--set", o]
    return args


def run_trainer(cmd: list[str], env: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
    """Run the trainer, streaming its output into our log; (exit code, result of its JSON line).

    While it runs, SIGTERM to this process (Airflow killing the task) is forwarded to the trainer,
    which writes a checkpoint at its next step and exits; we wait for that instead of leaving an
    orphan holding the GPU. The previous handler (Airflow's on_kill) still runs.
    """
    result = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
    log.info("trainer pid %d: %s", proc.pid, " ".join(cmd))
    previous = None

    def forward(signum, frame):
        if proc.poll() is None:
            log.warning("%s: forwarding to trainer pid %d and waiting for its checkpoint",
                        signal.Signals(signum).name, proc.pid)
            proc.send_signal(signum)
        if callable(previous):
            previous(signum, frame)

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, forward)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip()
            if line.startswith('{"run_id"'):
                result = json.loads(line)
            elif line and "it/s]" not in line:
                log.info("trainer: %s", line)
        proc.wait()
    finally:
        if proc.poll() is None:  # torn down (e.g. Airflow's execution timeout): leave no trainer behind
            proc.terminate()  # it checkpoints at its next step ...
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:  # ... or is killed; the retry resumes from the last complete one
                proc.kill()
                proc.wait()
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return proc.returncode, result


# -- Kubernetes --------------------------------------------------------------------------------

def kubernetes_pod_kwargs(cfg: DispatchConfig, args: list[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Arguments of the `KubernetesPodOperator` that trains (everything but task-level ones).

    `args` are the trainer's CLI arguments (may be Jinja templates). The pod mounts the state PVC
    at the workers' SHOEFIX_HOME path, so the snapshot path from `validate_qa` and the adapter
    path it returns mean the same file on both sides; the result comes back through the xcom
    sidecar (`--result-file /airflow/xcom/return.json`).
    """
    from kubernetes.client import models as k8s

    env = os.environ if env is None else env
    plain = {"SHOEFIX_HOME": cfg.state_path, "SHOEFIX_REQUIRE_GPU": "1", "PYTHONUNBUFFERED": "1",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    copied = {k: env[k] for k in POD_PLAIN_ENV if env.get(k)}
    for k, v in copied.items():
        if "@" in v.split("//", 1)[-1].split("/", 1)[0]:  # user:password@host in a URL
            raise ValueError(f"{k} looks like it holds a credential; put it in the Secret {cfg.secret!r}")
    plain.update(copied)
    cmds = launch_prefix(cfg.gpus, python="python")
    tolerations = [k8s.V1Toleration(key=t.get("key"), operator=t.get("operator", "Equal"), value=t.get("value"),
                                    effect=t.get("effect"), toleration_seconds=t.get("tolerationSeconds"))
                   for t in cfg.tolerations]
    return {
        "name": "shoefix-train",
        "namespace": cfg.namespace,
        "image": cfg.image,
        "cmds": cmds,
        "arguments": [*args, "--result-file", XCOM_RESULT],
        "labels": {"app.kubernetes.io/name": "shoefix-trainer"},
        "env_vars": [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(plain.items())],
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=cfg.secret))],
        "container_resources": k8s.V1ResourceRequirements(
            requests={"cpu": cfg.cpu, "memory": cfg.memory},
            limits={"memory": cfg.memory, "nvidia.com/gpu": str(cfg.gpus)}),  # GPUs: limits only (= requests)
        "node_selector": dict(cfg.node_selector),
        "tolerations": tolerations,
        "volumes": [
            k8s.V1Volume(name="shoefix-state",
                         persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=cfg.pvc)),
            # NCCL and dataloader workers use /dev/shm; a container's default is 64 MiB
            k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="16Gi")),
        ],
        "volume_mounts": [k8s.V1VolumeMount(name="shoefix-state", mount_path=cfg.state_path),
                          k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        "service_account_name": cfg.service_account or None,
        "do_xcom_push": True,
        "get_logs": True,
        "log_events_on_failure": True,
        "reattach_on_restart": True,  # a restarted worker follows the running pod instead of starting another
        "on_finish_action": "delete_pod",  # and on_kill deletes it too (task killed or timed out)
        "termination_grace_period": cfg.grace_period_s,
        # a pod orphaned by a lost worker still ends: Kubernetes kills it past the task's timeout
        "active_deadline_seconds": cfg.timeout_s + cfg.grace_period_s,
        "startup_timeout_seconds": 1800,  # first pull of a CUDA image on a fresh node
    }


def pod_exit_code(remote_pod: Any, container: str = "base") -> int | None:
    """The trainer container's exit code from a finished pod (k8s V1Pod), if it terminated."""
    statuses = getattr(getattr(remote_pod, "status", None), "container_statuses", None) or []
    for s in statuses:
        terminated = getattr(getattr(s, "state", None), "terminated", None)
        if s.name == container and terminated is not None:
            return terminated.exit_code
    return None
