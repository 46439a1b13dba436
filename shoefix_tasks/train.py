"""LoRA SFT of the expert model: `python -m shoefix_tasks.train --recipe NAME --snapshot FILE ...`.

One entry point for every place training runs: a subprocess of the Airflow worker (embedded
default), a Celery worker on the `gpu` queue, a Kubernetes pod from the trainer image, or
`accelerate launch -m shoefix_tasks.train` across the GPUs of one node.

Retry-safe: outputs live under `--output-dir` (one per pipeline run), the MLflow run is found by
its run key, and training resumes from the last *complete* checkpoint. The last line printed on
stdout is a JSON object (run id, adapter folder) for the caller.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Recipe, Settings, load_recipe

log = logging.getLogger("shoefix_tasks.train")
COMPLETE_MARKERS = ("trainer_state.json", "adapter_model.safetensors")


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest `checkpoint-N` holding every file a resume needs; partial ones are ignored."""
    best: tuple[int, Path] | None = None
    for path in output_dir.glob("checkpoint-*"):
        try:
            step = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        if all((path / m).is_file() and (path / m).stat().st_size > 0 for m in COMPLETE_MARKERS):
            if best is None or step > best[0]:
                best = (step, path)
    return best[1] if best else None


def make_mlflow_callback(run_id: str):
    """Logs the loss curve (and lr, grad norm) into the run, step by step."""
    import mlflow
    from transformers import TrainerCallback

    client = mlflow.MlflowClient()

    class MlflowLossCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            metrics = {f"train/{k}": float(v) for k, v in logs.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            ts = int(__import__("time").time() * 1000)
            for k, v in metrics.items():
                client.log_metric(run_id, k, v, timestamp=ts, step=state.global_step)

    return MlflowLossCallback()


def train(recipe: Recipe, snapshot: Path, output_dir: Path, run_key: str, settings: Settings) -> dict[str, Any]:
    import mlflow
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from trl import SFTTrainer

    from shoefix_tasks import tracking
    from shoefix_tasks.adapter import write_manifest
    from shoefix_tasks.base_model import base_identity, load_base
    from shoefix_tasks.records import read_jsonl
    from shoefix_tasks.training_setup import build_dataset, build_lora_config, build_sft_config

    tracking.configure(settings)
    rows = read_jsonl(snapshot)
    dataset = build_dataset(rows, recipe)
    snapshot_hash = snapshot.stem
    ident = base_identity(recipe.model.base_model, settings)
    run_id = tracking.run_for("train", run_key, run_name=f"train-{recipe.name}", tags={
        "shoefix.recipe": recipe.name, "shoefix.snapshot": snapshot_hash, "shoefix.base_model": ident["name"]})
    client = mlflow.MlflowClient()
    if not client.get_run(run_id).data.params:  # params are immutable: log them once per run
        params = {**recipe.flat_params(), "data.snapshot_hash": snapshot_hash, "data.train_records": len(dataset),
                  "base.sha256": ident["sha256"][:16]}
        for k, v in params.items():
            client.log_param(run_id, k, str(v)[:500])
        with mlflow.start_run(run_id=run_id):
            import pandas as pd

            frame = pd.DataFrame([{"id": r["id"], "lang": r["lang"], "topic": r["topic"]} for r in rows])
            mlflow.log_input(mlflow.data.from_pandas(frame, source=str(snapshot), name=f"corpus-{snapshot_hash[:12]}"),
                             context="training")

    cuda = torch.cuda.is_available()
    model, tokenizer = load_base(recipe.model.base_model, settings, recipe.model.dtype, recipe.quant,
                                 recipe.model.attn_implementation)
    if recipe.quant.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    model = get_peft_model(model, build_lora_config(recipe.lora))
    args = build_sft_config(recipe.train, output_dir, cuda, cuda and torch.cuda.is_bf16_supported())
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[make_mlflow_callback(run_id)])
    resume = last_complete_checkpoint(output_dir)
    if resume:
        log.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    write_manifest(adapter_dir, ident, {"recipe": recipe.name, "snapshot_hash": snapshot_hash,
                                        "training_run": run_id})
    client.log_metric(run_id, "train/final_loss", float(result.training_loss))
    client.log_metric(run_id, "train/runtime_s", float(result.metrics.get("train_runtime", 0.0)))
    client.log_artifacts(run_id, str(adapter_dir), "adapter")
    client.set_terminated(run_id)
    out = {"run_id": run_id, "experiment_id": client.get_run(run_id).info.experiment_id, "adapter_dir": str(adapter_dir), "snapshot_hash": snapshot_hash,
           "recipe": recipe.name, "train_records": len(dataset), "final_loss": float(result.training_loss),
           "resumed_from": str(resume) if resume else None}
    (output_dir / "train_result.json").write_text(json.dumps(out, indent=1))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shoefix_tasks.train", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="default", help="recipe name (shoefix_tasks/recipes) or YAML path")
    p.add_argument("--snapshot", required=True, type=Path, help="corpus snapshot JSONL (content-hashed)")
    p.add_argument("--output-dir", required=True, type=Path, help="per-run folder: checkpoints + adapter")
    p.add_argument("--run-key", required=True, help="the pipeline run this training belongs to")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.learning_rate=1e-4 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch_threads = os.environ.get("SHOEFIX_TORCH_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    out = train(recipe, args.snapshot, args.output_dir, args.run_key, Settings.from_env())
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
