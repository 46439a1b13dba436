"""Small pure factories: recipe sections -> training library objects (LoRA config, SFT config,
dataset). No model-name sniffing, no version checks. The attention kernel and the quantization config,
which inference needs too, live in shoefix_tasks.model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shoefix_tasks.config import LoraConfig, Recipe, TrainConfig
from shoefix_tasks.model.prompting import training_example

log = logging.getLogger(__name__)


def build_lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")


def attach_lora(model, cfg: LoraConfig):
    """`model` with the recipe's LoRA, the adapter in fp32 or in the base's dtype (`lora.adapter_dtype`)."""
    from peft import get_peft_model

    return get_peft_model(model, build_lora_config(cfg), autocast_adapter_dtype=cfg.adapter_dtype == "float32")


def cpu_bf16_native() -> bool:
    """Does this CPU do bf16 arithmetic in hardware (AVX512-BF16 or AMX)? Without it, CPU autocast
    to bf16 is emulated and a training step runs tens of times slower than in fp32."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(mode: str, cuda: bool, bf16_supported: bool) -> tuple[bool, bool]:
    """(bf16, fp16) for the Trainer. 'auto' is the seed's rule: bf16 where supported, else fp16;
    on a CPU 'auto' means none. An explicit 'bf16' on a CPU is CPU autocast, which pays only on cores
    with native bf16 (`bf16_supported`, see cpu_bf16_native: AVX512-BF16 or AMX; benchmarks/cpu_bf16.py);
    elsewhere it would be emulated, so it falls back to fp32. fp16 never runs on a CPU."""
    if not cuda:
        if mode == "bf16" and not bf16_supported:
            log.warning("mixed_precision bf16 asked for, but this CPU has no native bf16 (AVX512-BF16/AMX): "
                        "training in fp32 instead (emulated bf16 is many times slower)")
        return mode == "bf16" and bf16_supported, False
    if mode == "auto":
        return (True, False) if bf16_supported else (False, True)
    return mode == "bf16", mode == "fp16"


def build_sft_config(cfg: TrainConfig, output_dir: Path, cuda: bool, bf16_supported: bool) -> Any:
    from trl import SFTConfig

    bf16, fp16 = resolve_precision(cfg.mixed_precision, cuda, bf16_supported)
    # transformers renamed gradient_checkpointing to activation_checkpointing within 5.x; GPU images with an
    # older 5.x (the device image has 5.17) know only the old name, and the old name warns on newer ones
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                     else "gradient_checkpointing")
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=cfg.max_length,
        packing=cfg.packing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        **{checkpointing: cfg.gradient_checkpointing},
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        use_liger_kernel=cfg.use_liger_kernel,
        # step_metrics off: no NaN check of every micro-batch's loss (a read from the card), and batches
        # copied to the card without waiting (pinned memory, the Trainer's default)
        logging_nan_inf_filter=cfg.step_metrics,
        accelerator_config={"non_blocking": cuda and not cfg.step_metrics},
        completion_only_loss=True,  # loss on answer tokens only
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to="none",  # MLflow logging is ours (train.MlflowLossCallback): one run, resumable
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def build_dataset(rows: list[dict[str, Any]], recipe: Recipe):
    """Training examples for the recipe's languages, in a stable order."""
    from datasets import Dataset

    wanted = set(recipe.train.languages)
    picked = sorted((r for r in rows if r["lang"] in wanted), key=lambda r: r["id"])
    if not picked:
        raise ValueError(f"no training records in languages {sorted(wanted)}")
    return Dataset.from_list([training_example(r["question"], r["answer"]) for r in picked])
