"""Does the product's trainer work on the GPU with real weights: versions and the base converted from the
shipped GGUF (`setup`), packed against unpacked loss (`packing`), and where a step's time goes (`profile`)."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.real_weights.common import REPO, log, recipe_for, run_metric, split_corpus


def cmd_setup(args) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    from shoefix_tasks.config import Settings
    from shoefix_tasks.model.base import base_identity

    versions = {}
    for n in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "mlflow-skinny", "gguf", "bitsandbytes"):
        try:
            versions[n] = md.version(n)
        except md.PackageNotFoundError:
            versions[n] = None
    t0 = time.perf_counter()
    ident = base_identity(args.base, Settings.from_env())
    out = {"versions": versions, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "base": {k: ident.get(k) for k in ("name", "sha256", "tokenizer_sha256", "source")},
           "base_resolve_s": round(time.perf_counter() - t0, 1)}
    log(json.dumps(out, indent=1))
    return out


def _throughput_bench():
    """benchmarks/gpu_train_throughput.py as a module: its varlen check and its step timer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gtt", REPO / "benchmarks" / "gpu_train_throughput.py")
    gtt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gtt)
    return gtt


def cmd_packing(args) -> dict[str, Any]:
    """Packed batch (varlen kernel) vs each example alone (sdpa), with the real base, as the trainer builds it."""
    from trl import SFTTrainer

    from shoefix_tasks.config import Settings
    from shoefix_tasks.model.base import load_base
    from shoefix_tasks.training.factories import attach_lora, build_dataset, build_sft_config

    gtt = _throughput_bench()
    train_rows, _ = split_corpus(Path(args.data))
    recipe = recipe_for({"name": "packing", "epochs": 1, "lr": 1e-4, "r": 16}, args.base, args.device)
    model, tok = load_base(recipe.model.base_model, Settings.from_env(), recipe.model.dtype, recipe.quant,
                           recipe.model.attn_implementation)
    model = attach_lora(model, recipe.lora).to(args.device)
    results = []
    for mb, length in ((1, 1024), (4, 512)):  # one long bin holding several answers; the recipe's shape
        r = recipe_for({"name": "packing", "epochs": 1, "lr": 1e-4, "r": 16}, args.base, args.device)
        r.train.per_device_train_batch_size, r.train.max_length = mb, length
        trainer = SFTTrainer(model=model, args=build_sft_config(r.train, Path(args.work) / "packing", args.device == "cuda",
                                                                args.device == "cuda"),
                             train_dataset=build_dataset(train_rows, r), processing_class=tok)
        check = gtt.varlen_kernel_check(trainer, args.device)
        results.append({"bins_per_micro_batch": mb, "max_length": length, **check,
                        "control_no_boundaries": cross_attention_control(trainer, args.device, check["alone_sdpa_nll"]),
                        "per_token": boundary_logprob_check(trainer, args.device)})
    log(json.dumps(results, indent=1))
    return {"packing": results}


def cross_attention_control(trainer, device: str, alone: float) -> dict[str, Any]:
    """The same packed row through plain causal sdpa (positions still restart, but no example
    boundaries): what attention across examples does to the loss, so the packed-vs-alone difference
    can be read against it."""
    import torch
    import torch.nn.functional as F

    from shoefix_tasks.config import VARLEN_ATTN

    model = trainer.model
    base = model.get_base_model()
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    base.set_attn_implementation("sdpa")
    try:
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
            # an explicit all-ones mask: given restarting position_ids and no mask, transformers infers the
            # packed examples and builds the block-diagonal mask itself, which would make this no control at all
            logits = model(input_ids=ids, position_ids=batch["position_ids"].to(device), attention_mask=torch.ones_like(ids),
                           use_cache=False).logits.float()
    finally:
        base.set_attn_implementation(VARLEN_ATTN)
    crossed = float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"))
    return {"crossed_sdpa_nll": round(crossed, 3), "rel_diff_vs_alone": abs(crossed - alone) / alone}


def boundary_logprob_check(trainer, device: str, head: int = 16) -> dict[str, Any]:
    """Per-token log-probabilities instead of one summed loss (which hides a small effect in bf16 rounding).

    For every next-token prediction inside an example: packed through `shoefix_varlen` vs the example alone
    through sdpa, and the control (the packed row through plain causal sdpa, attention across examples) vs
    alone. Attention across examples shows where it is largest, in the first `head` positions of every
    example after the first (its context there is mostly the previous example); rounding shows everywhere
    alike. So the verdict compares the near-boundary differences of varlen with those of the control, and
    with varlen's own differences far from boundaries.
    """
    import torch
    import torch.nn.functional as F

    from shoefix_tasks.config import VARLEN_ATTN

    model = trainer.model
    base = model.get_base_model()
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k not in ("seq_idx", "labels")}
    ids, cu = batch["input_ids"], batch["cu_seq_lens_q"].tolist()

    def next_token_lp(**inputs) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = model(**inputs, use_cache=False).logits.float()[0, :-1]
        return F.log_softmax(logits, -1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]

    packed = next_token_lp(**batch)
    base.set_attn_implementation("sdpa")
    try:
        crossed = next_token_lp(input_ids=ids, position_ids=batch["position_ids"], attention_mask=torch.ones_like(ids))
        alone = {a: next_token_lp(input_ids=ids[:, a:b]) for a, b in zip(cu[:-1], cu[1:], strict=True)}
    finally:
        base.set_attn_implementation(VARLEN_ATTN)
    near, far, first = [], [], []  # (|varlen - alone|, |control - alone|, exactly equal) per prediction
    for e, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        for k in range(b - a - 1):  # position a+k predicts token a+k+1, both inside the example
            v, c = packed[a + k] - alone[a][k], crossed[a + k] - alone[a][k]
            pair = (abs(float(v)), abs(float(c)), bool(v == 0))
            # `first`: the first example's first positions, the same short contexts as `near` with no
            # example before them: the rounding baseline for `near`
            (near if e > 0 and k < head else first if k < head else far).append(pair)

    def stats(vals: list[float]) -> dict[str, float]:
        return {"max": round(max(vals), 5), "mean": round(statistics.fmean(vals), 6)} if vals else {}

    out = {"examples": len(cu) - 1, "predictions_near_boundary": len(near), "predictions_far": len(far),
           "varlen_vs_alone_near": stats([v for v, _, _ in near]), "varlen_equal_near": sum(q for _, _, q in near),
           "varlen_vs_alone_first_example": stats([v for v, _, _ in first]),
           "varlen_vs_alone_far": stats([v for v, _, _ in far]),
           "control_vs_alone_near": stats([c for _, c, _ in near]), "control_vs_alone_far": stats([c for _, c, _ in far])}
    if near and first:
        rounding = max(out["varlen_vs_alone_first_example"]["mean"], out["varlen_vs_alone_far"].get("mean", 0.0))
        out["verdict"] = ("no attention across examples"
                          if out["varlen_vs_alone_near"]["mean"] <= 2 * max(out["varlen_vs_alone_first_example"]["mean"], 1e-6)
                          and out["control_vs_alone_near"]["mean"] > 10 * max(rounding, out["varlen_vs_alone_near"]["mean"])
                          else "inconclusive or contaminated: read the figures")
    log(f"per-token check: {json.dumps(out)}")
    return out


def cmd_profile(args) -> dict[str, Any]:
    """Where a training step of the GPU recipe goes: per-step times, then torch.profiler over a few steps.

    The product trainer (shoefix_tasks.training.train.train) with one extra callback; the tables of the
    most expensive operators (CPU side and CUDA side) go to the log."""
    import torch
    from transformers import TrainerCallback

    from shoefix_tasks.config import Settings
    from shoefix_tasks.records import write_jsonl
    from shoefix_tasks.training.train import train

    work = Path(args.work)
    train_rows, _ = split_corpus(Path(args.data))
    snapshot = write_jsonl(work / "snapshots" / "train-split.jsonl", train_rows)
    cuda = torch.cuda.is_available()
    gtt = _throughput_bench()
    results = {}
    for name, extra in args.profile_variants:
        recipe = recipe_for({"name": f"profile-{name}", "epochs": 3, "lr": 1e-3, "r": 64}, args.base, args.device, extra)

        class Profile(TrainerCallback):
            """torch.profiler over steps profile_at .. profile_at + profile_steps."""

            def __init__(self):
                self.prof = None

            def on_step_begin(self, a, state, *rest, **k):
                if state.global_step == args.profile_at and self.prof is None:
                    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                    self.prof = torch.profiler.profile(activities=acts)
                    self.prof.__enter__()

            def on_step_end(self, a, state, *rest, **k):
                if self.prof is not None and state.global_step == args.profile_at + args.profile_steps:
                    self.prof.__exit__(None, None, None)

        timer, probe = gtt.make_step_timer(cuda), Profile()
        shutil.rmtree(work / "profile" / name, ignore_errors=True)  # a fresh training, never a resume
        t0 = time.perf_counter()
        res = train(recipe, snapshot, work / "profile" / name, f"profile-{name}", Settings.from_env(),
                    callbacks=(timer, probe))
        wall = time.perf_counter() - t0
        steps = [b - a for a, b in zip([timer.t0, *timer.ends[:-1]], timer.ends, strict=True)]
        row = {"extra": {k: str(v) for k, v in extra.items()}, "steps": len(steps), "process_part_s": round(wall, 1),
               "first_step_s": round(steps[0], 3) if steps else None,
               "median_step_s": round(statistics.median(steps[1:]), 4) if len(steps) > 1 else None,
               "train_tokens": run_metric(res["run_id"], "train/num_tokens"),
               "train_runtime_s": run_metric(res["run_id"], "train/runtime_s")}
        if row["train_tokens"] and row["train_runtime_s"]:
            row["tokens_per_s"] = round(row["train_tokens"] / row["train_runtime_s"], 1)
        if probe.prof is not None:
            ka = probe.prof.key_averages()
            row["top_cpu"] = ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
            if cuda:
                row["top_cuda"] = ka.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
            row["profiled_steps"] = args.profile_steps
            print(f"== {name}: top by self CPU time over {args.profile_steps} steps\n{row['top_cpu']}", flush=True)
            if cuda:
                print(f"== {name}: top by self CUDA time\n{row['top_cuda']}", flush=True)
        log(f"profile {name}: " + json.dumps({k: v for k, v in row.items() if not k.startswith("top_")}))
        results[name] = row
        if cuda:
            torch.cuda.empty_cache()
    return {"profile": results}
