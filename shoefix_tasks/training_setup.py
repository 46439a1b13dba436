"""Small pure factories: recipe sections -> library objects. No model-name sniffing, no version checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoefix_tasks.config import LoraConfig, QuantConfig, Recipe, TrainConfig
from shoefix_tasks.prompting import training_example


def build_lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")


def build_quant_config(cfg: QuantConfig):
    """bitsandbytes 4-bit config; bitsandbytes itself is only imported when QLoRA is asked for."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype))


def resolve_precision(mode: str, cuda: bool, bf16_supported: bool) -> tuple[bool, bool]:
    """(bf16, fp16) for the Trainer. 'auto' is the seed's rule: bf16 where supported, else fp16;
    on a CPU 'auto' means none. An explicit 'bf16' on a CPU is CPU autocast, which pays on cores
    with AVX512-BF16 (measured 1.5x on this 2-core machine, benchmarks/cpu_bf16.py); fp16 never
    runs on a CPU."""
    if not cuda:
        return mode == "bf16", False
    if mode == "auto":
        return (True, False) if bf16_supported else (False, True)
    return mode == "bf16", mode == "fp16"


def build_sft_config(cfg: TrainConfig, output_dir: Path, cuda: bool, bf16_supported: bool) -> Any:
    from trl import SFTConfig

    bf16, fp16 = resolve_precision(cfg.mixed_precision, cuda, bf16_supported)
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
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        use_liger_kernel=cfg.use_liger_kernel,
        completion_only_loss=True,  # loss on answer tokens only
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to="none",  # MLflow logging is ours (callbacks.py): one run, resumable
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
