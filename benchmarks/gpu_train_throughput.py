"""LoRA training throughput on one CUDA GPU, through the product's own recipe and factories.

Random-init models with the shapes of Qwen2.5-0.5B-Instruct and Qwen2.5-1.5B-Instruct (no hub
downloads) are written to a local folder once and loaded with `shoefix_tasks.model.base.load_base`,
exactly as training loads a base. Each variant is a recipe (`shoefix_tasks/recipes/*.yaml`, plus
`section.key=value` overrides) turned into a PEFT `LoraConfig` and an `SFTConfig` by
`shoefix_tasks.training.factories`, trained with TRL's `SFTTrainer` for one epoch over the same
synthetic prompt/completion examples (so every variant sees the same training tokens), then
scored on a held-out synthetic set.

Per variant it reports real (non-padding) tokens/s over the steady-state steps, the padding
fraction of the tokens fed to the model, peak GPU memory, MFU (4*N FLOPs per real token, N = base
parameter count, over a 989 TFLOP/s dense bf16 peak) and the held-out loss on completion tokens
before and after training. With --latency it also times 256-token greedy answers at batch 1 on a
merged adapter (0.5B shape), as `shoefix_tasks.model.generation.measure_latency` does.

    python benchmarks/gpu_train_throughput.py --size 0.5b --latency --out /tmp/bench
    python benchmarks/gpu_train_throughput.py --size 1.5b --out /tmp/bench
    python benchmarks/gpu_train_throughput.py --size tiny --device cpu --out /tmp/bench   # smoke test

Results: <out>/results-<size>.json (one object per variant, with per-step times) and a table on stdout.
On the device machine, benchmarks/run_gpu_bench.sh installs the carried wheels first; docs/benchmarks.md
has the commands, the numbers and how to read them. Caveat found there: with padded batches every new
padded length costs extra the first time a process sees it (see docs/benchmarks.md, "cold shapes"), so
the order of variants in one process matters; --warmup does not remove it.

Everything measured is product code: the committed recipes, `shoefix_tasks.training.factories` (SFTConfig, the
`shoefix_varlen` attention registered by `load_base`), and for latency `generation.load_answerer` +
`generation.measure_latency` on an adapter with a real manifest. The script adds only the synthetic
model and data, the timing, and a check of the CUDA varlen kernel against per-example sdpa.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

PROCESS_T0 = time.perf_counter()  # whole-process figures count from here (interpreter start-up excluded)
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEAK_BF16_FLOPS = 989e12  # H200 SXM dense bf16, datasheet
VOCAB = 151936
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-0.5B-Instruct config.json
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=21),
    # Qwen/Qwen2.5-1.5B-Instruct config.json
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=False, max_window_layers=21),
    # CPU smoke test of the script itself
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=2),
}
GPU_RECIPE = {"0.5b": "qwen2.5-0.5b-gpu", "1.5b": "qwen2.5-1.5b-gpu", "tiny": "qwen2.5-0.5b-gpu"}
PADDED = ["model.attn_implementation=sdpa", "train.packing=false", "train.per_device_train_batch_size=32",
          "train.group_by_length=true"]

# name -> (recipe, extra overrides, description). "{gpu}" is the size's GPU recipe.
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "seed": ("seed", [], "seed recipe: fp32 weights + bf16 autocast, bs 8 x GA 2, padded, random order, "
                         "gradient checkpointing, adamw_8bit"),
    "gpu": ("{gpu}", [], "GPU recipe as committed: bf16, packed padding-free bins (16 x 1024), shoefix_varlen "
                         "attention, no checkpointing, fused AdamW, no LoRA dropout"),
    "gpu-bs8": ("{gpu}", ["train.per_device_train_batch_size=8"], "GPU recipe with 8 packed bins per micro-batch"),
    "gpu-bs32": ("{gpu}", ["train.per_device_train_batch_size=32"], "GPU recipe with 32 packed bins per micro-batch"),
    "gpu-bf16ad": ("{gpu}", ["lora.adapter_dtype=base"], "GPU recipe with the LoRA adapter in bf16 (no casts)"),
    "gpu-fp32ad": ("{gpu}", ["lora.adapter_dtype=float32"], "GPU recipe with the LoRA adapter in fp32 (PEFT's default)"),
    "gpu-bs32-bf16ad": ("{gpu}", ["lora.adapter_dtype=base", "train.per_device_train_batch_size=32"],
                        "GPU recipe, adapter in bf16, 32 packed bins per micro-batch"),
    "gpu-nosync": ("{gpu}", ["train.step_metrics=false"],
                   "GPU recipe without TRL's per-step entropy/accuracy: nothing read back from the card mid-step"),
    "gpu-step-metrics": ("{gpu}", ["train.step_metrics=true"],
                         "GPU recipe with TRL's per-step entropy/accuracy (the recipe before step_metrics: false)"),
    "gpu-bs32-lr4e-4": ("{gpu}", ["train.step_metrics=true", "train.per_device_train_batch_size=32",
                                  "train.learning_rate=4e-4"],
                        "GPU recipe with TRL's per-step metrics, 32 packed bins per micro-batch, learning rate "
                        "doubled with the batch"),
    "gpu-nosync-bs32-lr4e-4": ("{gpu}", ["train.step_metrics=false", "train.per_device_train_batch_size=32",
                                         "train.learning_rate=4e-4"],
                               "no per-step metrics, 32 packed bins per micro-batch, learning rate doubled"),
    "gpu-liger": ("{gpu}", ["train.use_liger_kernel=true"], "GPU recipe + Liger kernels (RMSNorm, RoPE, SwiGLU)"),
    "gpu-packed-sdpa": ("{gpu}", ["model.attn_implementation=sdpa"],
                        "GPU recipe with sdpa instead of varlen: dense block-diagonal mask over the packed row"),
    "gpu-padded": ("{gpu}", PADDED, "the previous GPU recipe: bs 32 length-grouped padded batches, sdpa"),
    "qlora": ("qlora-gpu", [], "QLoRA as committed: NF4 4-bit base, the GPU recipe's packing/attention/batch"),
    "qlora-padded": ("qlora-gpu", PADDED, "QLoRA with the previous padded batches"),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# environment

def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "host": platform.node()}
    for mod in ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger_kernel", "triton"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as err:  # noqa: BLE001 - report, don't fail
            info[mod] = f"unavailable ({type(err).__name__}: {str(err)[:80]})"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}")
    return info


def gemm_ceiling() -> float:
    """Achieved dense bf16 matmul rate (TFLOP/s) on this card: 8192^3, median of 20 timed runs."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


# ----------------------------------------------------------------------------------------------
# synthetic base model, tokenizer and data

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def make_tokenizer():
    """A word-level tokenizer over ids of the real vocabulary, with Qwen's special-token ids and a
    ChatML-like template, so the product's prompt code (`generation._encode`) runs unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "system": 1, "user": 2, "assistant": 3,
             "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    vocab.update({f"w{i}": 1000 + i for i in range(2000)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_base(size: str, folder: Path, device: str) -> dict[str, Any]:
    """Random-init Qwen2 of the given shape, saved (bf16 safetensors + tokenizer) to `folder`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
                      sliding_window=32768, attention_dropout=0.0, initializer_range=0.02,
                      bos_token_id=151643, eos_token_id=151645, **SHAPES[size])
    torch.manual_seed(1234)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    n_embed = model.get_input_embeddings().weight.numel()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"n_params": n_params, "n_embedding": n_embed, "config": {k: v for k, v in SHAPES[size].items()}}


def make_data(n_train: int, n_eval: int, min_len: int, max_len: int, seed: int = 20261129):
    """Prompt/completion examples of `min_len..max_len` token ids. Tokens come from 512 ids of the real
    vocabulary and follow a fixed first-order Markov chain (4 successors per token), so a held-out loss
    can fall well below log(vocab) while the base is a random init. Same data for every variant."""
    rng = random.Random(seed)
    ids = rng.sample(range(2000, 151000), 512)
    succ = {t: rng.sample(ids, 4) for t in ids}
    weights = [0.55, 0.25, 0.15, 0.05]

    def example() -> dict[str, list[int]]:
        n = rng.randint(min_len, max_len)
        n_prompt = max(1, int(n * rng.uniform(0.2, 0.5)))
        seq = [rng.choice(ids)]
        while len(seq) < n:
            seq.append(rng.choices(succ[seq[-1]], weights)[0])
        return {"input_ids": seq, "completion_mask": [0] * n_prompt + [1] * (n - n_prompt)}

    return [example() for _ in range(n_train)], [example() for _ in range(n_eval)]


# ----------------------------------------------------------------------------------------------
# measurement helpers

class CountingCollator:
    """Wraps the trainer's collator: real (non-padding), fed (incl. padding) and loss tokens per batch."""

    def __init__(self, inner):
        self.inner = inner
        self.real: list[int] = []
        self.fed: list[int] = []
        self.loss: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.real.append(sum(len(e["input_ids"]) for e in examples))
        self.fed.append(int(batch["input_ids"].numel()))
        self.loss.append(int((batch["labels"] != -100).sum()))
        return batch


def make_step_timer(cuda: bool):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = 0.0
            self.ends: list[float] = []
            self.losses: list[float] = []

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(self._now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def make_profiler(first: int, last: int, out: Path):
    """torch.profiler over optimizer steps first..last (1-based): where a step's time goes on the card and on
    the CPU. Profiling slows the steps it covers, so a profiled run is never one of the timed rows."""
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == first:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == last:
                self._report(last - first + 1)

        def on_train_end(self, args, state, control, **kwargs):
            if self.prof is not None:  # fewer steps than asked for: report what was profiled
                self._report(state.global_step - first + 1)

        def _report(self, n: int) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            ka = self.prof.key_averages()
            # kernels only: an op's row repeats the time of the kernels it launched
            cuda_us = sum(e.self_device_time_total for e in ka
                          if e.device_type == torch.autograd.DeviceType.CUDA)
            launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx",
                                                             "cudaLaunchKernelExC"))
            summary = (f"profiled steps {first}..{first + n - 1}: CUDA time per step {cuda_us / n / 1e3:.1f} ms, "
                       f"kernel launches per step {launches / n:.0f}")
            out.mkdir(parents=True, exist_ok=True)
            (out / "profile.txt").write_text(summary + "\n" + table)
            log(summary)
            print(table, flush=True)
            self.prof = None

    return StepProfiler()


def held_out_loss(model, rows: list[dict[str, list[int]]], device: str, bf16: bool) -> float:
    """Mean NLL per completion token, one sequence at a time (no padding, identical for every variant)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            x = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor([[t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"], strict=True)]],
                                  device=device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=x).logits
            total += float(F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100,
                                           reduction="sum"))
            count += int((labels[0, 1:] != -100).sum())
    if was_training:
        model.train()
    return total / count


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def varlen_kernel_check(trainer, device: str) -> dict[str, Any]:
    """One packed batch: summed NLL through `shoefix_varlen` (the CUDA varlen kernel on a GPU) against every
    example run alone through sdpa. bf16 arithmetic: a relative difference around 1e-3 is rounding;
    attention across examples would show as a far larger one (the CPU test measures ~6e-4 on a tiny model)."""
    import torch
    import torch.nn.functional as F

    from shoefix_tasks.config import VARLEN_ATTN

    model = trainer.model
    base = model.get_base_model()
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "seq_idx"}

    def nll(**inputs) -> float:
        labels = inputs.pop("labels")
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = model(**inputs, use_cache=False).logits.float()
        return float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"))

    packed = nll(**batch)
    cu = batch["cu_seq_lens_q"].tolist()
    base.set_attn_implementation("sdpa")
    try:
        alone = sum(nll(input_ids=batch["input_ids"][:, a:b], labels=batch["labels"][:, a:b])
                    for a, b in zip(cu[:-1], cu[1:], strict=True))
    finally:
        base.set_attn_implementation(VARLEN_ATTN)
    return {"examples": len(cu) - 1, "tokens": cu[-1], "packed_varlen_nll": round(packed, 3),
            "alone_sdpa_nll": round(alone, 3), "rel_diff": abs(packed - alone) / alone}


# ----------------------------------------------------------------------------------------------
# one variant

def run_variant(name: str, size: str, base_dir: Path, base_meta: dict[str, Any], train_rows, eval_rows,
                work: Path, device: str, keep_adapter: Path | None = None,
                check_kernel: bool = True, loss_before: bool = True,
                profile: tuple[int, int, Path] | None = None) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import prepare_model_for_kbit_training

    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.model.base import load_base
    from shoefix_tasks.training.factories import attach_lora, build_sft_config
    from shoefix_tasks.training.trainer import build_trainer

    recipe_name, extra, desc = VARIANTS[name]
    recipe_name = recipe_name.format(gpu=GPU_RECIPE[size])
    overrides = [f"model.base_model={base_dir}", "train.num_train_epochs=1", "train.max_steps=-1",
                 "train.save_steps=1000000", "train.logging_steps=1", *extra]
    if device == "cpu":  # smoke test: no bitsandbytes optimizers, no fused CUDA optimizer
        overrides += ["train.optim=adamw_torch"]
    recipe = load_recipe(recipe_name, overrides)
    t = recipe.train
    cuda = device == "cuda"
    res: dict[str, Any] = {
        "variant": name, "size": size, "recipe": recipe_name, "overrides": extra, "description": desc,
        "settings": {"dtype": recipe.model.dtype, "attn": recipe.model.attn_implementation,
                     "load_in_4bit": recipe.quant.load_in_4bit, "bs": t.per_device_train_batch_size,
                     "ga": t.gradient_accumulation_steps, "packing": t.packing, "group_by_length": t.group_by_length,
                     "gradient_checkpointing": t.gradient_checkpointing, "optim": t.optim,
                     "mixed_precision": t.mixed_precision, "liger": t.use_liger_kernel, "max_length": t.max_length,
                     "step_metrics": t.step_metrics,
                     "lora": {"r": recipe.lora.r, "alpha": recipe.lora.alpha, "dropout": recipe.lora.dropout,
                              "target_modules": recipe.lora.target_modules,
                              "adapter_dtype": recipe.lora.adapter_dtype}, "lr": t.learning_rate},
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_load = time.perf_counter()
    model, tokenizer = load_base(recipe.model.base_model, Settings.from_env(), recipe.model.dtype, recipe.quant,
                                 recipe.model.attn_implementation)
    if recipe.quant.load_in_4bit:  # as shoefix_tasks.training.train does
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    model = attach_lora(model, recipe.lora)  # as shoefix_tasks.training.train does
    res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    args = build_sft_config(t, work / name, cuda, bf16_ok)
    res["sft"] = {"bf16": args.bf16, "fp16": args.fp16, "padding_free": bool(args.padding_free),
                  "packing_strategy": args.packing_strategy, "train_sampling_strategy": args.train_sampling_strategy}
    timer = make_step_timer(cuda)
    train_ds = Dataset.from_list(train_rows)
    callbacks = [timer, make_profiler(*profile)] if profile else [timer]
    trainer = build_trainer(model, args, train_ds, tokenizer, callbacks, t.step_metrics)  # as training does
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    res["padding_free"] = bool(getattr(trainer, "padding_free", False))
    res["setup_s"] = round(time.perf_counter() - t_load, 2)
    amp = args.bf16
    model_dev = next(trainer.model.parameters()).device
    trainer.model.to(model_dev if recipe.quant.load_in_4bit else device)
    if loss_before:  # a forward pass over the held-out set: it also warms the GPU, so --cold skips it
        res["eval_loss_before"] = round(held_out_loss(trainer.model, eval_rows, device, amp), 4)

    result = trainer.train()
    if cuda:
        torch.cuda.synchronize()
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    res["train_runtime_s"] = round(float(result.metrics.get("train_runtime", 0.0)), 2)
    res["final_train_loss"] = round(timer.losses[-1], 4) if timer.losses else None
    res["eval_loss_after"] = round(held_out_loss(trainer.model, eval_rows, device, amp), 4)
    if recipe.model.attn_implementation == "shoefix_varlen" and check_kernel:
        try:
            res["varlen_check"] = varlen_kernel_check(trainer, device)
        except Exception as err:  # noqa: BLE001 - report, don't lose the variant
            res["varlen_check"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        log(f"varlen check: {res['varlen_check']}")

    steps = len(timer.ends)
    ga = t.gradient_accumulation_steps
    warm = max(2, steps // 10)
    last = steps - 1 if steps - 1 - warm >= 3 else steps  # the last step may be partial: leave it out
    if last - warm < 1:
        warm = 0
    t_start = timer.ends[warm - 1] if warm > 0 else timer.t0
    elapsed = timer.ends[last - 1] - t_start
    win = slice(warm * ga, last * ga)
    real_win = sum(counter.real[win])
    n_batches = steps * ga
    real_all, fed_all = sum(counter.real[:n_batches]), sum(counter.fed[:n_batches])
    tps = real_win / elapsed
    res.update(
        steps=steps, window_steps=f"{warm + 1}..{last}", window_s=round(elapsed, 3),
        real_tokens_epoch=real_all, fed_tokens_epoch=fed_all, loss_tokens_epoch=sum(counter.loss[:n_batches]),
        padding_frac=round(1 - real_all / fed_all, 4), real_tokens_per_micro_batch=round(real_all / n_batches, 1),
        real_tokens_per_s=round(tps, 1),
        epoch_real_tokens_per_s=round(real_all / (timer.ends[-1] - timer.t0), 1),
        first_step_s=round(timer.ends[0] - timer.t0, 3),
        process_s_at_train_end=round(timer.ends[-1] - PROCESS_T0, 2),
        mfu=round(tps * 4 * base_meta["n_params"] / PEAK_BF16_FLOPS, 4),
        step_s=[round(b - a, 4) for a, b in zip([timer.t0, *timer.ends[:-1]], timer.ends, strict=True)],
        step_real_tokens=[sum(counter.real[i * ga:(i + 1) * ga]) for i in range(steps)],
    )
    if keep_adapter is not None:
        trainer.model.save_pretrained(keep_adapter)
        tokenizer.save_pretrained(keep_adapter)
    del trainer, model, result
    free_memory(device)
    return res


# ----------------------------------------------------------------------------------------------
# answer latency (merged adapter, batch 1, 256 new tokens)

def latency(base_dir: Path, adapter_dir: Path, size: str, n: int, device: str) -> dict[str, Any]:
    """The product path: `generation.load_answerer` (manifest verified, adapter merged, on the GPU with a
    static KV cache) and `generation.measure_latency` (one untimed answer, then `n`, exactly 256 new
    tokens each). Then the same answerer with the static cache switched off, for comparison."""
    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.model.adapter import write_manifest
    from shoefix_tasks.model.base import base_identity
    from shoefix_tasks.model.generation import generate, load_answerer, measure_latency

    recipe = load_recipe(GPU_RECIPE[size], [f"model.base_model={base_dir}"])
    new_tokens, rp = 256, recipe.eval.repetition_penalty
    settings = Settings.from_env()
    write_manifest(adapter_dir, base_identity(str(base_dir), settings), {"recipe": recipe.name, "benchmark": True})
    ans = load_answerer(str(base_dir), adapter_dir, settings, recipe.model.dtype, label="bench")
    # Prompts through the synthetic tokenizer itself: AutoTokenizer rebuilds a Qwen2Tokenizer from the saved
    # file (model_type qwen2), which mangles a word-level vocabulary. Only prompt ids matter here.
    ans.tokenizer = make_tokenizer()
    ans.tokenizer.padding_side = "left"
    rng = random.Random(7)
    questions = [" ".join(f"w{rng.randrange(2000)}" for _ in range(rng.randint(15, 60))) for _ in range(n)]
    out: dict[str, Any] = {"new_tokens": new_tokens, "repetition_penalty": rp, "dtype": recipe.model.dtype,
                           "device": str(ans.model.device), "static_cache_len": ans.static_cache_len}
    t0 = time.perf_counter()
    generate(ans, [questions[0]], new_tokens, 1, rp)
    out["first_call_s"] = round(time.perf_counter() - t0, 2)  # compiles the decode step (static cache)
    out["product_path"] = measure_latency(ans, questions, new_tokens, rp)
    log(f"latency, product path (static cache: {ans.static_cache_len}): {out['product_path']}")
    static_words = generate(ans, questions[1:2], 64, 1, rp)[0]["answer"].split()  # word-level tokenizer
    ans.static_cache_len = 0
    dynamic_words = generate(ans, questions[1:2], 64, 1, rp)[0]["answer"].split()
    same = next((i for i, (a, b) in enumerate(zip(static_words, dynamic_words, strict=False)) if a != b),
                min(len(static_words), len(dynamic_words)))
    out["greedy_static_vs_dynamic"] = {"tokens": len(static_words), "same_leading_tokens": same}
    out["dynamic_cache"] = measure_latency(ans, questions[:3], new_tokens, rp)
    log(f"latency, dynamic cache: {out['dynamic_cache']}")
    ans = None  # noqa: F841 - release the GPU memory before the next part
    free_memory(device)
    return out


# ----------------------------------------------------------------------------------------------

def table(results: list[dict[str, Any]]) -> str:
    seed = {r["size"]: r for r in results if r["variant"] == "seed" and "real_tokens_per_s" in r}
    head = ("| size | variant | bs x GA | real tok/s | x seed | padding | peak GiB | MFU | eval loss "
            "before -> after | steps | train s | varlen vs alone |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        if "real_tokens_per_s" not in r:
            lines.append(f"| {r['size']} | {r['variant']} | failed: {r.get('error', '?')[:90]} |"
                         " | | | | | | | | |")
            continue
        s = r["settings"]
        base = seed.get(r["size"])
        ratio = f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.1f}x" if base else "-"
        lines.append(
            f"| {r['size']} | {r['variant']} | {s['bs']} x {s['ga']} | {r['real_tokens_per_s']:,.0f} | {ratio} | "
            f"{100 * r['padding_frac']:.1f}% | {r.get('peak_mem_gib', 0):.1f} | {100 * r['mfu']:.1f}% | "
            f"{r.get('eval_loss_before', float('nan')):.3f} -> {r['eval_loss_after']:.3f} | {r['steps']} | {r['train_runtime_s']:.1f} | "
            f"{r.get('varlen_check', {}).get('rel_diff', '-')} |")
    return "\n".join(lines)


def compare(files: list[Path]) -> str:
    """One table over results files written by separate processes (one variant each, `--cold`): the
    product's view, where every training is the first in its process. Ratios are against the `seed` row."""
    rows = []
    for f in files:
        doc = json.loads(f.read_text())
        for r in doc["results"]:
            if "real_tokens_per_s" in r:
                rows.append({**r, "label": f.parent.name, "cold": doc["environment"].get("cold"),
                             "triton_cache": doc["environment"].get("triton_cache_dir")})
    seed = next((r for r in rows if r["variant"] == "seed"), None)
    head = ("| process | variant | cold | first step s | whole first epoch: real tok/s | x seed | steps 2..n-1 (steady): "
            "real tok/s | x seed | train s | process s at train end | eval loss after |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        e = f"{r['epoch_real_tokens_per_s'] / seed['epoch_real_tokens_per_s']:.1f}x" if seed else "-"
        w = f"{r['real_tokens_per_s'] / seed['real_tokens_per_s']:.1f}x" if seed else "-"
        out.append(f"| {r['label']} | {r['variant']} | {r['cold']} | {r.get('first_step_s', '-')} | "
                   f"{r['epoch_real_tokens_per_s']:,.0f} | {e} | {r['real_tokens_per_s']:,.0f} | {w} | "
                   f"{r['train_runtime_s']:.1f} | {r.get('process_s_at_train_end', '-')} | {r['eval_loss_after']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SHAPES))
    p.add_argument("--compare", type=Path, nargs="*", help="print one table over these results files, then exit")
    p.add_argument("--variants", default="gpu,seed,gpu-padded,qlora,gpu-bs8",
                   help=f"comma-separated, from {sorted(VARIANTS)}")
    p.add_argument("--n-train", type=int, default=1280)
    p.add_argument("--n-eval", type=int, default=128)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=500)
    p.add_argument("--latency", action="store_true", help="also time 256-token answers (needs the 'gpu' variant)")
    p.add_argument("--latency-samples", type=int, default=10)
    p.add_argument("--latency-after", default="seed", help="run the latency part right after this variant")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, default=Path("/tmp/shoefix-bench"))
    p.add_argument("--work", type=Path, default=Path("/tmp/shoefix-bench-work"))
    p.add_argument("--warmup", type=int, default=256,
                   help="untimed training of the first variant on this many examples first (0 = none)")
    p.add_argument("--deadline-s", type=float, default=0, help="skip variants that would start after this (0 = none)")
    p.add_argument("--cold", action="store_true",
                   help="a product run's view: no GEMM ceiling and no held-out forward pass before the first "
                        "training, so nothing warms the GPU for it (use with --warmup 0 and one variant)")
    p.add_argument("--profile-steps", default="", metavar="A:B",
                   help="torch.profiler over optimizer steps A..B, table in <out>/profile.txt (not a timed run)")
    args = p.parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return 0
    if not args.size:
        p.error("--size is required")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SHOEFIX_HOME", str(args.work / "home"))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    env = environment(args.device)
    if args.device == "cuda" and not args.cold:
        env["gemm_bf16_tflops_8192"] = round(gemm_ceiling(), 1)
    env["cold"] = args.cold
    env["triton_cache_dir"] = os.environ.get("TRITON_CACHE_DIR")
    from shoefix_tasks.model.attention import _varlen_kernel

    env["varlen_kernel"] = _varlen_kernel() is not None
    log(json.dumps(env))

    base_dir = args.work / f"base-{args.size}"
    t0 = time.perf_counter()
    base_meta = make_base(args.size, base_dir, args.device)
    log(f"base {args.size}: {base_meta['n_params']:,} params, written in {time.perf_counter() - t0:.1f}s")
    train_rows, eval_rows = make_data(args.n_train, args.n_eval, args.min_len, args.max_len)
    mean_len = statistics.mean(len(r["input_ids"]) for r in train_rows)
    log(f"data: {len(train_rows)} train / {len(eval_rows)} held-out examples, mean length {mean_len:.0f} tokens")

    results: list[dict[str, Any]] = []
    out_file = args.out / f"results-{args.size}.json"

    def dump(extra: dict[str, Any] | None = None) -> None:
        doc = {"environment": env, "base": base_meta, "n_train": len(train_rows), "n_eval": len(eval_rows),
               "mean_example_tokens": round(mean_len, 1), "peak_bf16_flops": PEAK_BF16_FLOPS,
               "results": results, **(extra or {})}
        out_file.write_text(json.dumps(doc, indent=1))

    adapter_dir = args.work / f"adapter-{args.size}"
    lat: dict[str, Any] | None = None

    def run_latency() -> dict[str, Any]:
        if not (adapter_dir / "adapter_config.json").is_file():
            return {"error": "no adapter from the 'gpu' variant"}
        log("latency: 256-token greedy answers, batch 1, merged adapter")
        try:
            return latency(base_dir, adapter_dir, args.size, args.latency_samples, args.device)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            free_memory(args.device)
            return {"error": f"{type(err).__name__}: {err}"[:500]}

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    profile = None
    if args.profile_steps:
        a, b = (int(x) for x in args.profile_steps.split(":"))
        profile = (a, b, args.out)
    if args.warmup and names:
        # The first training in a process pays for CUDA/cuBLAS/allocator warm-up well past its first steps
        # (seen on the H200: the first variant ran ~2x slower than the same settings later). Untimed.
        log(f"warm-up: {names[0]} on {args.warmup} examples (discarded)")
        t0 = time.perf_counter()
        try:
            run_variant(names[0], args.size, base_dir, base_meta, train_rows[: args.warmup], eval_rows[:4],
                        args.work / "warmup", args.device, check_kernel=False)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            free_memory(args.device)
        log(f"warm-up done in {time.perf_counter() - t0:.1f}s")

    for name in names:
        if args.deadline_s and time.perf_counter() - start > args.deadline_s:
            log(f"skip {name}: past the deadline")
            results.append({"variant": name, "size": args.size, "error": "skipped (time budget)"})
            continue
        log(f"variant {name}: {VARIANTS[name][2]}")
        try:
            r = run_variant(name, args.size, base_dir, base_meta, train_rows, eval_rows, args.work, args.device,
                            keep_adapter=adapter_dir if name == "gpu" else None, loss_before=not args.cold,
                            profile=profile)
        except Exception as err:  # noqa: BLE001 - one broken variant must not cost the others
            traceback.print_exc()
            r = {"variant": name, "size": args.size, "error": f"{type(err).__name__}: {err}"[:500]}
            free_memory(args.device)
        results.append(r)
        log(f"variant {name}: {json.dumps(r)}")
        dump({"latency": lat} if lat else None)
        print(table(results), flush=True)
        if args.latency and lat is None and name == args.latency_after:
            lat = run_latency()
            dump({"latency": lat})

    if args.latency and lat is None:
        lat = run_latency()
        dump({"latency": lat})
    log(f"total {time.perf_counter() - start:.0f}s")
    print("\n" + json.dumps({"environment": env, "n_params": base_meta["n_params"]}))
    print(table(results))
    if lat is not None:
        print("latency:", json.dumps(lat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
