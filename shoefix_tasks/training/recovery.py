"""How training survives faults: complete checkpoints, the out-of-memory back-off, graceful stops.

- Resume only from a *complete* checkpoint (the Trainer writes `trainer_state.json` last).
- Out of memory: the micro-batch shrinks and gradient accumulation grows by the same factor, so
  the effective batch is unchanged; the shape is persisted beside the checkpoints so a retry in
  another process (an Airflow retry, maybe on another worker) starts from it.
- SIGTERM / SIGINT: a checkpoint at the end of the current step, then a clean stop.

No heavy imports at module level (transformers and torch are imported inside the callbacks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from shoefix_tasks.config import TrainConfig

log = logging.getLogger("shoefix_tasks.training.train")
COMPLETE_MARKERS = ("trainer_state.json", "adapter_model.safetensors")
BACKOFF_FILE = "oom_backoff.json"


class TrainingStopped(RuntimeError):
    """A stop signal arrived; a checkpoint was written at the next step."""


class OomFloorError(RuntimeError):
    """Out of memory at micro-batch 1: the back-off has nowhere left to go."""


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) as set by `accelerate launch` / torchrun; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest `checkpoint-N` holding every file a resume needs; partial ones are ignored.

    The Trainer writes `trainer_state.json` last, so a checkpoint cut short (killed, disk full)
    has none, or a truncated one: it must parse and name step N.
    """
    best: tuple[int, Path] | None = None
    for path in output_dir.glob("checkpoint-*"):
        try:
            step = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        if not all((path / m).is_file() and (path / m).stat().st_size > 0 for m in COMPLETE_MARKERS):
            continue
        try:
            if json.loads((path / "trainer_state.json").read_text()).get("global_step") != step:
                continue
        except (ValueError, OSError):
            continue
        if best is None or step > best[0]:
            best = (step, path)
    return best[1] if best else None


# -- out-of-memory back-off ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchShape:
    micro_batch: int
    grad_accum: int

    def __str__(self) -> str:
        return f"{self.micro_batch}x{self.grad_accum}"


def batch_shape(output_dir: Path, cfg: TrainConfig) -> BatchShape:
    """The recipe's micro-batch x accumulation, or the backed-off one persisted for this run."""
    path = output_dir / BACKOFF_FILE
    if path.is_file():
        data = json.loads(path.read_text())
        return BatchShape(int(data["micro_batch"]), int(data["grad_accum"]))
    return BatchShape(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)


def backed_off(shape: BatchShape) -> BatchShape:
    """Divide the micro-batch by its smallest prime factor, multiply accumulation by it: the
    effective batch (micro x accum) stays exactly the same. 8x1 -> 4x2 -> 2x4 -> 1x8; 6x1 -> 3x2;
    5x1 -> 1x5."""
    mb = shape.micro_batch
    if mb <= 1:
        raise OomFloorError(
            f"out of memory at micro-batch 1 (x{shape.grad_accum} accumulation): shorten train.max_length, "
            "enable train.gradient_checkpointing or quant.load_in_4bit, or use a larger GPU")
    factor = next(p for p in range(2, mb + 1) if mb % p == 0)
    return BatchShape(mb // factor, shape.grad_accum * factor)


def record_backoff(output_dir: Path, old: BatchShape, new: BatchShape, step: int | None) -> None:
    """Persist the new shape beside the checkpoints, so an Airflow retry (another process, maybe
    another worker on the shared volume) starts from it instead of running out of memory again."""
    path = output_dir / BACKOFF_FILE
    history = json.loads(path.read_text())["history"] if path.is_file() else []
    history.append({"from": str(old), "to": str(new), "after_step": step, "time": time.time()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"micro_batch": new.micro_batch, "grad_accum": new.grad_accum,
                               "history": history}, indent=1))
    tmp.replace(path)


# -- graceful stop -----------------------------------------------------------------------------

def make_stop_callback():
    """On SIGTERM/SIGINT: save a checkpoint at the end of the current step, then stop.

    The handler only sets a flag (a signal can arrive mid-kernel); the Trainer acts on it at the
    next step boundary. Under DDP the flag is max-reduced so every rank saves and stops at the same
    step (a rank saving alone would wait forever in the save's barrier). Repeated SIGTERMs are
    harmless (Airflow signals the task's process group and the task forwards it too); a second
    SIGINT (Ctrl-C twice) ends the process at once.
    """
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        def __init__(self) -> None:
            self.requested: str | None = None
            self.stopped_at: int | None = None

        def request(self, signum, frame) -> None:
            self.requested = signal.Signals(signum).name
            if signum == signal.SIGINT:
                signal.signal(signum, signal.default_int_handler)
            log.warning("%s received: writing a checkpoint at the end of this step, then stopping", self.requested)

        def on_step_end(self, args, state, control, **kwargs):
            asked = self.requested is not None
            if rank_and_world()[1] > 1:
                import torch
                import torch.distributed as dist

                flag = torch.tensor([1.0 if asked else 0.0], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                asked = flag.item() > 0
            if asked:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                log.info("checkpoint-%d complete", state.global_step)

    return GracefulStop()


@contextlib.contextmanager
def catching_stop_signals(stop):
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. not inside a worker thread)
        return
    previous = {s: signal.signal(s, stop.request) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
