"""Small pure factories: recipe sections -> library objects. No model-name sniffing, no version checks.

Also the attention for padding-free (packed) training, `shoefix_varlen`. TRL's padding-free collator
flattens a micro-batch into one row and passes each example's boundaries (`cu_seq_lens_q/k`) and
restarting `position_ids`. With `sdpa`, transformers turns those into a dense block-diagonal mask over
the whole row: quadratic in the packed length (16 bins of 1024 tokens = 16,384 tokens, a 268M-entry
mask): 18.7k tokens/s on the 0.5B shape on an H200, against 60.4k with `shoefix_varlen`
(docs/benchmarks.md). `shoefix_varlen` runs PyTorch's
varlen flash attention on the boundaries (CUDA), or one causal sdpa call per example (CPU): either way
no token attends across an example boundary (tests/unit/test_packing.py checks the loss equals the
unpacked one).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shoefix_tasks.config import VARLEN_ATTN, LoraConfig, QuantConfig, Recipe, TrainConfig
from shoefix_tasks.prompting import training_example

log = logging.getLogger(__name__)


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


def register_attention(name: str | None) -> None:
    """Make our own attention implementations known to transformers before a model is loaded with
    one of them; other names (sdpa, eager, ...) are transformers' own and need nothing."""
    if name != VARLEN_ATTN:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
    # Like flash attention: no dense mask is built (None when unpadded), only a padded batch's 2D mask
    # comes through, and varlen_attention_forward refuses it.
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTN, flash_attention_mask)


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10, CUDA (flash) only
    except ImportError:
        return None
    return varlen_attn


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed example. query (B, H, T, D), key/value (B, Hkv, T, D);
    returns (B, T, H, D) as transformers' attention functions do.

    Sequences: `cu_seq_lens_q` from the padding-free collator (B == 1), or, without it, each row of an
    unpadded batch (e.g. scoring one example). A padded batch (a 2D mask) is refused: this kernel
    never masks padding, so recipes only pair it with packing (config.Recipe) and inference loads sdpa.
    """
    import torch
    import torch.nn.functional as F

    if attention_mask is not None:
        raise ValueError(f"{VARLEN_ATTN} attention takes packed (padding-free) batches, not padded ones")
    if dropout or kwargs.get("sliding_window"):
        raise ValueError(f"{VARLEN_ATTN} attention supports neither attention dropout nor sliding windows")
    b, n_heads, t, d = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # one sequence per row
        cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=query.device)
        max_len = t
    else:
        if b != 1:
            raise ValueError("cu_seq_lens_q given for a batch of several rows")
        max_len = int(kwargs.get("max_length_q") or int(cu.diff().max()))
    # (B, H, T, D) -> (tokens, heads, head_dim); GQA: repeat each key/value head for its query heads
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    rep = n_heads // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kernel = _varlen_kernel() if query.is_cuda else None
    if kernel is not None:
        cu = cu.to(device=query.device, dtype=torch.int32)
        # flash kernels take half precision only; under QLoRA the norms are upcast to fp32 (PEFT's
        # prepare_model_for_kbit_training), so q/k/v can arrive in fp32: run in the autocast dtype
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = (x.to(half) if x.dtype == torch.float32 else x for x in (q, k, v))
        out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, scale=scaling,
                     window_size=(-1, 0)).to(query.dtype)  # (-1, 0): every earlier token, none later = causal
    else:  # CPU (tests, the embedded default): one causal sdpa per example, same result
        bounds = cu.tolist()
        parts = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                v[s:e].transpose(0, 1), is_causal=True, scale=scaling).transpose(0, 1)
                 for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
        out = torch.cat(parts, dim=0)
    return out.reshape(b, t, n_heads, d), None


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
