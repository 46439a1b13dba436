"""Training under faults, on the tiny model (issue 5 OOM back-off; issue 7 scenarios 1-3).

- CUDA out of memory (a real `torch.cuda.OutOfMemoryError`, raised by a callback at a chosen
  step): retried at half the micro-batch and twice the accumulation, resumed from the last
  complete checkpoint, one MLflow run; the shape persists for an Airflow retry; a floor at 1.
- SIGTERM to a real `python -m shoefix_tasks.train`: checkpoint at the next step, exit 143, the
  retry resumes from it. SIGTERM to the pipeline task's process is forwarded to the trainer.
- SIGKILL mid-epoch: the retry resumes from the last complete checkpoint, same MLflow run, and at
  most one registry version.
- Disk full (real ENOSPC from a small tmpfs mounted over the output folder): the previous
  checkpoint stays usable and no adapter is uploaded; the retry completes.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shoefix_tasks.config import load_recipe
from shoefix_tasks.errors import EXIT_STOPPED
from shoefix_tasks.model.adapter import verify_adapter
from shoefix_tasks.training.recovery import (
    BACKOFF_FILE,
    BatchShape,
    OomFloorError,
    backed_off,
    last_complete_checkpoint,
)
from shoefix_tasks.training.train import train, train_with_backoff
from tests.conftest import ROOT, copy_fixture_corpus, env_with


def test_backoff_keeps_the_effective_batch():
    assert backed_off(BatchShape(8, 1)) == BatchShape(4, 2)
    assert backed_off(BatchShape(4, 2)) == BatchShape(2, 4)
    assert backed_off(BatchShape(6, 1)) == BatchShape(3, 2)
    assert backed_off(BatchShape(5, 3)) == BatchShape(1, 15)  # prime: straight to 1, still 15 per step
    with pytest.raises(OomFloorError, match="micro-batch 1"):
        backed_off(BatchShape(1, 8))


def test_truncated_trainer_state_is_not_complete(tmp_path):
    """A checkpoint cut short while writing trainer_state.json (its last file) is never resumed."""
    for step, state in [(2, {"global_step": 2}), (4, None)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"w")
        text = json.dumps(state) if state else '{"global_step": 4, "log_hist'  # truncated by a full disk
        (d / "trainer_state.json").write_text(text)
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"


# -- helpers -----------------------------------------------------------------------------------

def _snapshot(settings) -> Path:
    from shoefix_tasks.intake.collect import collect_batch
    from shoefix_tasks.intake.validate import validate_batch

    copy_fixture_corpus(settings)
    collect_batch(settings, "r1")
    return Path(validate_batch(settings, "r1").snapshot_path)


def _recipe(tiny_recipe: Path, **train) -> Path:
    data = yaml.safe_load(tiny_recipe.read_text())
    data["train"].update(train)
    path = tiny_recipe.with_name(f"faults-{len(train)}-{abs(hash(json.dumps(train, sort_keys=True)))}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def _train_runs(settings, run_key: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
    exp = client.get_experiment_by_name("shoefix")
    where = f"tags.`shoefix.run_key` = '{run_key}' and tags.`shoefix.stage` = 'train'"
    return client.search_runs([exp.experiment_id], where) if exp else []


def _loss_steps(settings, run_id: str) -> list[int]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


class OomAt:
    """Raises a real CUDA OOM at the end of step `step` (while the micro-batch is still `at_batch`,
    or always when `at_batch` is None)."""

    def __new__(cls, step: int, at_batch: int | None):
        import torch
        from transformers import TrainerCallback

        class _Oom(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step and at_batch in (None, args.per_device_train_batch_size):
                    raise torch.cuda.OutOfMemoryError(
                        f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at step {step})")

        return _Oom()


def ShapeSeen():  # noqa: N802 - a callback factory (transformers is imported lazily)
    """Records (step, micro-batch, accumulation) of every completed optimizer step."""
    from transformers import TrainerCallback

    class _Seen(TrainerCallback):
        steps: list = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((state.global_step, args.per_device_train_batch_size, args.gradient_accumulation_steps))

    seen = _Seen()
    seen.steps = []
    return seen


# -- out of memory -----------------------------------------------------------------------------

@pytest.mark.slow
def test_oom_backs_off_and_resumes_in_the_same_run(shoefix_env, tiny_recipe):
    s = shoefix_env
    snap = _snapshot(s)
    recipe = load_recipe(str(tiny_recipe))  # micro-batch 4, accumulation 1, 9 steps, checkpoints every 2
    out_dir = s.run_dir("r1") / "train"
    seen = ShapeSeen()
    out = train_with_backoff(recipe, snap, out_dir, "r1", s, callbacks=(OomAt(step=3, at_batch=4), seen))

    assert out["batch_shape"] == "2x2" and Path(out["resumed_from"]).name == "checkpoint-2"
    backoff = json.loads((out_dir / BACKOFF_FILE).read_text())
    assert (backoff["micro_batch"], backoff["grad_accum"]) == (2, 2)
    assert [(h["from"], h["to"], h["after_step"]) for h in backoff["history"]] == [("4x1", "2x2", 2)]
    final = last_complete_checkpoint(out_dir)
    assert _state(final)["global_step"] == 9
    assert seen.steps == [(1, 4, 1), (2, 4, 1)] + [(n, 2, 2) for n in range(3, 10)]  # step 3 redone at 2x2
    runs = _train_runs(s, "r1")
    assert len(runs) == 1 and runs[0].info.run_id == out["run_id"]
    assert runs[0].data.tags["shoefix.batch_shape"] == "2x2" and runs[0].info.status == "FINISHED"
    assert _loss_steps(s, out["run_id"]) == list(range(1, 10))  # one loss curve, no step lost or repeated
    verify_adapter(Path(out["adapter_dir"]))

    # an Airflow retry is a new process: it reads the persisted shape instead of the recipe's 4x1
    again = train_with_backoff(recipe, snap, out_dir, "r1", s)
    assert again["batch_shape"] == "2x2" and again["run_id"] == out["run_id"]


@pytest.mark.slow
def test_oom_at_micro_batch_1_stops_with_a_clear_error(shoefix_env, tiny_recipe):
    s = shoefix_env
    snap = _snapshot(s)
    recipe = load_recipe(str(tiny_recipe), ["train.per_device_train_batch_size=2", "train.max_steps=2"])
    out_dir = s.run_dir("r1") / "train"
    with pytest.raises(OomFloorError, match="out of memory at micro-batch 1 .x2 accumulation"):
        train_with_backoff(recipe, snap, out_dir, "r1", s, callbacks=(OomAt(step=1, at_batch=None),))
    backoff = json.loads((out_dir / BACKOFF_FILE).read_text())
    assert (backoff["micro_batch"], backoff["grad_accum"]) == (1, 2)
    assert not (out_dir / "adapter").exists()


# -- signals -----------------------------------------------------------------------------------

def _start_trainer(settings, recipe: Path, snap: Path, run_key: str = "r1", **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shoefix_tasks.train", "--recipe", str(recipe), "--snapshot", str(snap),
           "--run-key", run_key]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=env_with(settings, PYTHONUNBUFFERED="1", SHOEFIX_TORCH_THREADS="1"), **popen)


def _read_until(proc: subprocess.Popen, predicate, timeout: float = 300) -> list[str]:
    """Lines of the process's output up to and including the first one matching `predicate`."""
    seen, end = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line.rstrip())
        if predicate(line):
            return seen
        assert time.monotonic() < end, "timed out waiting for the trainer:\n" + "\n".join(seen[-30:])
    raise AssertionError("the process ended first:\n" + "\n".join(seen[-40:]))


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    rest = proc.communicate(timeout=timeout)[0]
    return proc.returncode, rest


def _retry(settings, recipe: Path, snap: Path) -> dict:
    proc = _start_trainer(settings, recipe, snap)
    code, out = _finish(proc, timeout=600)
    assert code == 0, out[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_the_retry_resumes(shoefix_env, tiny_recipe):
    """Scenario 2. Checkpoints every 5 steps, so the one SIGTERM writes is told apart from them."""
    s = shoefix_env
    snap = _snapshot(s)
    recipe = _recipe(tiny_recipe, save_steps=5, num_train_epochs=4)  # 12 steps
    out_dir = s.run_dir("r1") / "train"
    proc = _start_trainer(s, recipe, snap)
    _read_until(proc, lambda ln: ln.startswith("{'loss'"))  # step 1 done
    proc.send_signal(signal.SIGTERM)
    code, rest = _finish(proc)
    assert code == EXIT_STOPPED, rest[-3000:]
    stopped = last_complete_checkpoint(out_dir)
    step = _state(stopped)["global_step"]
    assert 1 <= step < 5 and f"stopped by SIGTERM at step {step}" in rest  # not a scheduled save
    assert not (out_dir / "adapter").exists()
    [run] = _train_runs(s, "r1")
    assert run.info.status == "RUNNING"  # unfinished: the retry continues it

    result = _retry(s, recipe, snap)
    assert result["resumed_from"] == str(stopped) and result["run_id"] == run.info.run_id
    assert _state(last_complete_checkpoint(out_dir))["global_step"] == 12
    assert _loss_steps(s, run.info.run_id) == list(range(1, 13))
    verify_adapter(Path(result["adapter_dir"]))


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_last_complete_checkpoint(shoefix_env, tiny_recipe, tiny_model):
    """Scenario 1: killed without warning mid-epoch; one MLflow run and at most one registry version."""
    import mlflow

    from shoefix_tasks.registry import versions as registry
    from shoefix_tasks.store import tracking
    s = shoefix_env
    snap = _snapshot(s)
    recipe = _recipe(tiny_recipe, save_steps=2, num_train_epochs=4)  # 3 steps an epoch, 12 steps
    out_dir = s.run_dir("r1") / "train"
    proc = _start_trainer(s, recipe, snap)
    seen = _read_until(proc, lambda ln: "checkpoint-4 complete" in ln)
    _read_until(proc, lambda ln: ln.startswith("{'loss'"))  # step 5 logged: inside epoch 2 (steps 4-6)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = last_complete_checkpoint(out_dir)
    assert _state(killed_at)["global_step"] >= 4 and any("checkpoint-2 complete" in ln for ln in seen)
    [run] = _train_runs(s, "r1")
    client = mlflow.MlflowClient(tracking_uri=s.tracking_uri)
    assert client.list_artifacts(run.info.run_id) == []  # nothing uploaded by the killed attempt

    result = _retry(s, recipe, snap)
    assert result["resumed_from"] == str(killed_at) and result["run_id"] == run.info.run_id
    assert len(_train_runs(s, "r1")) == 1
    verify_adapter(Path(result["adapter_dir"]))
    # the gate task, and a retry of it, register this training run: one version, never two
    tracking.configure(s)
    for _ in range(2):
        registry.register_version(result["run_id"], Path(result["adapter_dir"]), str(tiny_model), {}, "faults")
    assert len(client.search_model_versions("name='shoefix-expert'")) == 1


@pytest.mark.slow
def test_task_forwards_sigterm_to_the_trainer(shoefix_env, tiny_recipe):
    """Airflow kills the task process: `pipeline.train_adapter` forwards SIGTERM to its trainer child,
    which checkpoints and exits; the task raises and leaves no orphan holding the GPU."""
    s = shoefix_env
    snap = _snapshot(s)
    recipe = _recipe(tiny_recipe, save_steps=5, num_train_epochs=4)
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "from shoefix_tasks.pipeline import train_adapter; "
            f"train_adapter('r1', {str(recipe)!r}, {str(snap)!r})")
    # its own session: the signal below reaches the task process alone, never the trainer directly
    task = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, start_new_session=True,
                            env=env_with(s, PYTHONUNBUFFERED="1", SHOEFIX_TORCH_THREADS="1"))
    first = _read_until(task, lambda ln: "trainer: {'loss'" in ln)
    trainer_pid = int(next(ln for ln in first if "trainer pid" in ln).split("trainer pid ")[1].split(":")[0])
    os.kill(task.pid, signal.SIGTERM)
    rc, rest = _finish(task)
    assert rc != 0 and "forwarding to trainer pid" in rest and "TrainerStopped" in rest, rest[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(trainer_pid, 0)  # the trainer is gone (and was reaped)
    step = _state(last_complete_checkpoint(s.run_dir("r1") / "train"))["global_step"]
    assert 1 <= step < 5  # written on the signal, not a scheduled save


# -- disk full ---------------------------------------------------------------------------------

@pytest.fixture()
def small_disk(shoefix_env):
    """A real small filesystem (tmpfs) mounted over the run's output folder; needs root."""
    out_dir = shoefix_env.run_dir("r1") / "train"
    out_dir.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (ENOSPC is injected for real, not simulated)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=768k", "tmpfs", str(out_dir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield out_dir
    subprocess.run(["umount", "-l", str(out_dir)], check=False)


def _resize(mount: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


@pytest.mark.slow
def test_disk_full_while_checkpointing(shoefix_env, tiny_recipe, small_disk):
    """Scenario 3. One checkpoint of the tiny model is ~490 kB: checkpoint-2 fits in 768 kB,
    checkpoint-4 runs out of space part-way. The previous one stays the one resumed from."""
    import mlflow

    s = shoefix_env
    snap = _snapshot(s)
    proc = _start_trainer(s, tiny_recipe, snap)
    code, out = _finish(proc, timeout=600)
    # torch.save reports ENOSPC as an iostream error; the filesystem says what happened
    assert code not in (0, EXIT_STOPPED) and "_save_checkpoint" in out, out[-3000:]
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize < (small_disk / "checkpoint-2" / "optimizer.pt").stat().st_size  # full
    assert (small_disk / "checkpoint-4").is_dir()  # cut short ...
    assert last_complete_checkpoint(small_disk).name == "checkpoint-2"  # ... and ignored
    assert not (small_disk / "adapter").exists()
    [run] = _train_runs(s, "r1")
    client = mlflow.MlflowClient(tracking_uri=s.tracking_uri)
    assert client.list_artifacts(run.info.run_id) == []

    _resize(small_disk, "64m")  # space freed: the retry resumes from checkpoint-2 and finishes
    result = _retry(s, tiny_recipe, snap)
    assert Path(result["resumed_from"]).name == "checkpoint-2" and result["run_id"] == run.info.run_id
    verify_adapter(Path(result["adapter_dir"]))


@pytest.mark.slow
def test_disk_full_while_writing_the_adapter_uploads_nothing(shoefix_env, tiny_recipe, small_disk):
    """The disk fills between the last checkpoint and the adapter: ENOSPC while writing it, nothing
    uploaded, no `adapter/` folder; with space again the retry publishes a verified adapter."""
    import mlflow
    from transformers import TrainerCallback

    class FillDisk(TrainerCallback):  # what another process on the same volume would do
        def on_train_end(self, args, state, control, **kwargs):
            st = os.statvfs(small_disk)
            with open(small_disk / "filler", "wb") as fh:
                fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 32 * 1024))

    s = shoefix_env
    snap = _snapshot(s)
    _resize(small_disk, "2m")  # room for the checkpoints (two at a time), not for them and an adapter
    recipe = load_recipe(str(tiny_recipe), ["train.save_total_limit=1"])
    with pytest.raises(Exception) as info:  # noqa: B017 - OSError, or safetensors' error wrapping it
        train(recipe, snap, small_disk, "r1", s, callbacks=(FillDisk(),))
    assert getattr(info.value, "errno", None) == errno.ENOSPC or "No space left" in str(info.value), info.value
    assert not (small_disk / "adapter").exists()
    [run] = _train_runs(s, "r1")
    assert mlflow.MlflowClient(tracking_uri=s.tracking_uri).list_artifacts(run.info.run_id) == []

    (small_disk / "filler").unlink()
    out = train(recipe, snap, small_disk, "r1", s)
    assert out["run_id"] == run.info.run_id
    manifest = verify_adapter(Path(out["adapter_dir"]))
    client = mlflow.MlflowClient(tracking_uri=s.tracking_uri)
    uploaded = {a.path.split("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert uploaded == set(manifest["files"]) | {"shoefix_manifest.json"}
