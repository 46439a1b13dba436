"""LoRA SFT of the expert model: `python -m shoefix_tasks.train --recipe NAME --snapshot FILE ...`.

One entry point for every place training runs: a subprocess of the Airflow worker (embedded
default), a Celery worker on the `gpu` queue, a Kubernetes pod from the trainer image, or
`accelerate launch -m shoefix_tasks.train` across the GPUs of one node (rank 0 alone talks to
MLflow, writes the adapter and prints the result).

Retry-safe: outputs live under `--output-dir` (one per pipeline run), the MLflow run is found by
its run key, and training resumes from the last *complete* checkpoint. The last line printed on
stdout is a JSON object (run id, adapter folder) for the caller. Exit codes: 0 done;
143 stopped on SIGTERM/SIGINT after writing a checkpoint (a retry resumes); 78 the GPU preflight
failed (this node cannot run the recipe: do not retry); 79 out of memory even at micro-batch 1;
anything else, an error worth a retry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Recipe, Settings, load_recipe
from shoefix_tasks.errors import EXIT_OOM_FLOOR, EXIT_PREFLIGHT, EXIT_STOPPED
from shoefix_tasks.training.recovery import (
    OomFloorError,
    TrainingStopped,
    backed_off,
    batch_shape,
    catching_stop_signals,
    last_complete_checkpoint,
    make_stop_callback,
    rank_and_world,
    record_backoff,
)

log = logging.getLogger("shoefix_tasks.training.train")
RESULT_FILE = "train_result.json"
RECIPE_FILE = "recipe.json"  # the resolved recipe this output folder belongs to

# -- callbacks ---------------------------------------------------------------------------------

def make_mlflow_callback(run_id: str):
    """Logs the loss curve (and lr, grad norm) into the run, step by step: one request a step."""
    import mlflow
    from transformers import TrainerCallback

    from shoefix_tasks.store import tracking

    client = mlflow.MlflowClient()

    class MlflowLossCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            metrics = {f"train/{k}": float(v) for k, v in logs.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            tracking.log_metrics(client, run_id, metrics, step=state.global_step)

    return MlflowLossCallback()


# -- the adapter -------------------------------------------------------------------------------

def publish_adapter(model, tokenizer, output_dir: Path, ident: dict[str, Any], extra: dict[str, Any]) -> Path:
    """Write the adapter into `adapter.partial/`, manifest it, verify it, then rename it into place.

    A write cut short (disk full, killed) leaves only `adapter.partial/`, which nothing reads; the
    `adapter/` folder is always complete and matches its manifest.
    """
    from shoefix_tasks.model.adapter import verify_adapter, write_manifest

    final, partial = output_dir / "adapter", output_dir / "adapter.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    write_manifest(partial, ident, extra)
    verify_adapter(partial)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


# -- training ----------------------------------------------------------------------------------

def train(recipe: Recipe, snapshot: Path, output_dir: Path, run_key: str, settings: Settings,
          callbacks: tuple = ()) -> dict[str, Any] | None:
    """One training attempt. Returns the result (rank 0) or None (other ranks).

    `callbacks` are extra `TrainerCallback`s (tests inject faults through them).
    """
    import mlflow
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import set_seed

    from shoefix_tasks.model.adapter import verify_adapter
    from shoefix_tasks.model.base import base_identity, load_base
    from shoefix_tasks.records import read_jsonl
    from shoefix_tasks.store import tracking
    from shoefix_tasks.training.factories import (
        attach_lora,
        build_dataset,
        build_sft_config,
        cpu_bf16_native,
    )
    from shoefix_tasks.training.trainer import build_trainer

    rank, _ = rank_and_world()
    shape = batch_shape(output_dir, recipe.train)
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(
        recipe.train, per_device_train_batch_size=shape.micro_batch, gradient_accumulation_steps=shape.grad_accum))
    rows = read_jsonl(snapshot)
    dataset = build_dataset(rows, recipe)
    snapshot_hash = snapshot.stem
    ident = base_identity(recipe.model.base_model, settings)
    run_id, client, extra_callbacks = None, None, []
    if rank == 0:  # one MLflow run, written by one process
        tracking.configure(settings)
        run_id = tracking.run_for("train", run_key, run_name=f"train-{recipe.name}", tags={
            "shoefix.recipe": recipe.name, "shoefix.recipe_sha256": recipe.digest, "shoefix.snapshot": snapshot_hash,
            "shoefix.base_model": ident["name"]})
        client = mlflow.MlflowClient()
        if not client.get_run(run_id).data.params:  # params are immutable: log them once per run
            _log_params(client, run_id, recipe, snapshot, rows, len(dataset), ident)
        client.set_tag(run_id, "shoefix.batch_shape", str(shape))  # micro-batch x accumulation in use
        extra_callbacks.append(make_mlflow_callback(run_id))

    cuda = torch.cuda.is_available()
    model, tokenizer = load_base(recipe.model.base_model, settings, recipe.model.dtype, recipe.quant,
                                 recipe.model.attn_implementation)
    if recipe.quant.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    set_seed(recipe.train.seed)  # LoRA's A matrices are initialised at random: same recipe, same adapter
    model = attach_lora(model, recipe.lora)
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else cpu_bf16_native()
    args = build_sft_config(recipe.train, output_dir, cuda, bf16_ok)
    stop = make_stop_callback()
    trainer = build_trainer(model, args, dataset, tokenizer, [stop, *extra_callbacks, *callbacks],
                            recipe.train.step_metrics)
    resume = last_complete_checkpoint(output_dir)
    if resume:
        log.info("resuming from %s with micro-batch x accumulation %s", resume, shape)
    with catching_stop_signals(stop):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.stopped_at is not None:
        raise TrainingStopped(f"stopped by {stop.requested} at step {stop.stopped_at}; "
                              f"checkpoint-{stop.stopped_at} written, a retry resumes from it")
    if rank != 0:
        return None

    adapter_dir = publish_adapter(model, tokenizer, output_dir, ident, {
        "recipe": recipe.name, "snapshot_hash": snapshot_hash, "training_run": run_id})
    tracking.log_metrics(client, run_id, {"train/final_loss": result.training_loss,
                                          "train/runtime_s": result.metrics.get("train_runtime", 0.0)})
    verify_adapter(adapter_dir)  # never upload a folder that does not match its manifest
    client.log_artifacts(run_id, str(adapter_dir), "adapter")
    client.set_terminated(run_id)
    out = {"run_id": run_id, "experiment_id": client.get_run(run_id).info.experiment_id,
           "adapter_dir": str(adapter_dir), "snapshot_hash": snapshot_hash, "recipe": recipe.name,
           "recipe_sha256": claimed_recipe(output_dir),
           "train_records": len(dataset), "final_loss": float(result.training_loss),
           "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
           "resumed_from": str(resume) if resume else None, "batch_shape": str(shape)}
    (output_dir / RESULT_FILE).write_text(json.dumps(out, indent=1))
    return out


def _log_params(client, run_id: str, recipe: Recipe, snapshot: Path, rows: list, n_train: int, ident: dict) -> None:
    import mlflow
    import pandas as pd
    from mlflow.entities import Param

    params = {**recipe.flat_params(), "data.snapshot_hash": snapshot.stem, "data.train_records": n_train,
              "base.sha256": ident["sha256"][:16]}
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])  # one request per 100
    with mlflow.start_run(run_id=run_id):
        frame = pd.DataFrame([{"id": r["id"], "lang": r["lang"], "topic": r["topic"]} for r in rows])
        with warnings.catch_warnings():  # a local path matches two of MLflow's equivalent local sources
            warnings.filterwarnings("ignore", message=r".*dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_pandas(frame, source=str(snapshot), name=f"corpus-{snapshot.stem[:12]}")
        mlflow.log_input(dataset, context="training")
    client.update_run(run_id, status="RUNNING")  # leaving the fluent run marked it FINISHED: not yet


def claim_output_dir(output_dir: Path, recipe: Recipe) -> None:
    """Record which recipe this output folder trains (its content hash); refuse a folder that holds
    another recipe's checkpoints: resuming them would mix two recipes in one adapter."""
    path = output_dir / RECIPE_FILE
    if path.is_file():
        held = json.loads(path.read_text())
        if held.get("sha256") != recipe.digest:
            raise ValueError(f"{output_dir} holds a run of recipe {held.get('name')!r} ({held.get('sha256', '')[:12]}), "
                             f"not of {recipe.name!r} ({recipe.digest[:12]}): use another output folder")
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": recipe.name, "sha256": recipe.digest, "recipe": recipe.to_dict()}, indent=1))


def claimed_recipe(output_dir: Path) -> str:
    path = output_dir / RECIPE_FILE
    return json.loads(path.read_text())["sha256"] if path.is_file() else ""


def finished_result(output_dir: Path, recipe: Recipe) -> dict[str, Any] | None:
    """The result of a training that already finished in this folder with this recipe, its adapter
    intact: a retried task (or a re-run pipeline) gets the same adapter, byte for byte, instead of
    publishing a new copy the registry would have to tell apart from the evaluated one."""
    from shoefix_tasks.model.adapter import AdapterIntegrityError, verify_adapter

    path = output_dir / RESULT_FILE
    if not path.is_file():
        return None
    out = json.loads(path.read_text())
    if out.get("recipe_sha256") != recipe.digest:
        return None
    try:
        verify_adapter(Path(out["adapter_dir"]))
    except (AdapterIntegrityError, OSError, KeyError):
        return None
    return out


def train_with_backoff(recipe: Recipe, snapshot: Path, output_dir: Path, run_key: str, settings: Settings,
                       callbacks: tuple = ()) -> dict[str, Any] | None:
    """`train`, retried in this process on CUDA out-of-memory with a backed-off batch shape.

    Each retry resumes from the last complete checkpoint in the same MLflow run. Under DDP the
    shape is persisted and the error raised: the whole launch fails, and its retry starts from it.
    """
    import gc

    import torch

    claim_output_dir(output_dir, recipe)
    done = finished_result(output_dir, recipe)
    if done is not None:
        log.info("%s already holds a finished training of this recipe: reusing adapter %s", output_dir, done["adapter_dir"])
        return done
    while True:
        shape = batch_shape(output_dir, recipe.train)
        try:
            return train(recipe, snapshot, output_dir, run_key, settings, callbacks)
        except torch.cuda.OutOfMemoryError as err:
            smaller = backed_off(shape)  # raises OomFloorError at micro-batch 1
            done = last_complete_checkpoint(output_dir)
            record_backoff(output_dir, shape, smaller, int(done.name.split("-")[1]) if done else None)
            log.warning("CUDA out of memory at micro-batch x accumulation %s (%s); retrying at %s from %s",
                        shape, str(err).splitlines()[0][:200], smaller, done or "the start")
            if rank_and_world()[1] > 1:
                raise
        gc.collect()  # outside the except block: the traceback no longer pins the step's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shoefix_tasks.train", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="default", help="recipe name (shoefix_tasks/recipes) or YAML path")
    p.add_argument("--snapshot", required=True, type=Path, help="corpus snapshot JSONL (content-hashed)")
    p.add_argument("--output-dir", type=Path,
                   help="per-run folder: checkpoints + adapter (default: $SHOEFIX_HOME/runs/<run key>/train)")
    p.add_argument("--run-key", required=True, help="the pipeline run this training belongs to")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.learning_rate=1e-4 (repeatable)")
    p.add_argument("--overrides-json", default="[]", metavar="JSON",
                   help='more overrides as one JSON list, e.g. \'["train.max_steps=10"]\' (for templated pods)')
    p.add_argument("--result-file", type=Path, action="append", default=[],
                   help="also write the result JSON here, e.g. /airflow/xcom/return.json in a pod (repeatable)")
    return p


def use_kernel_cache(settings: Settings) -> None:
    """Keep Triton's compiled kernels under SHOEFIX_HOME unless TRITON_CACHE_DIR says otherwise.

    TRL compiles its chunked log-prob kernels in the first step of every process whose cache is empty,
    and Triton's default cache lives in the home folder of the user, which a Kubernetes trainer pod loses
    when it ends. SHOEFIX_HOME is the state volume every pod mounts, so the second training on a cluster
    starts with the kernels compiled (docs/benchmarks.md: the first step, fresh vs warm cache)."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(settings.home / "cache" / "triton"))


def main(argv: list[str] | None = None) -> int:
    from shoefix_tasks.training import preflight
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe, [*args.overrides, *json.loads(args.overrides_json)])
    settings = Settings.from_env()
    args.output_dir = args.output_dir or settings.run_dir(args.run_key) / "train"
    try:
        preflight.check_node(recipe, settings)  # before touching data
    except preflight.PreflightError as err:
        log.error("GPU preflight failed: %s", err)
        return EXIT_PREFLIGHT
    args.output_dir.mkdir(parents=True, exist_ok=True)
    use_kernel_cache(settings)
    torch_threads = os.environ.get("SHOEFIX_TORCH_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    try:
        out = train_with_backoff(recipe, args.snapshot, args.output_dir, args.run_key, settings)
    except TrainingStopped as err:
        log.warning("%s", err)
        return EXIT_STOPPED
    except OomFloorError as err:
        log.error("%s", err)
        return EXIT_OOM_FLOOR
    if out is not None:  # rank 0
        for path in args.result_file:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out))
        sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
