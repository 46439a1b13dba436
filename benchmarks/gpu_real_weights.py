"""The real default base (SmolLM2-135M-Instruct) trained and judged on one GPU with the product's code.

Subcommands (one device call each; results accumulate under --work, so a sweep cut short by a call's
time limit resumes in the next call on the same warm machine):

  setup        versions, the GPU, the base converted from the shipped GGUF (base_model.resolve_base)
  packing      packed (`shoefix_varlen`) vs every example alone (sdpa): summed answer-token NLL, real weights
  sweep        epochs x learning rate x LoRA rank (+ the seed recipe): train with the trainer
               (shoefix_tasks.training.train.train_with_backoff), answer a validation split carved from the
               training corpus, the holdout and the guard set, score with the product's scorecard and claims
  final        the chosen recipe end to end: `python -m shoefix_tasks.train` in a fresh process (throughput
               over the whole run, cold), then `shoefix_tasks.evaluation.evaluate.evaluate` against the base and the
               production gate (shoefix_tasks.evaluation.gate.decide with the built-in policy)
  ceiling      seen vs unseen questions: sweep configs trained on the whole English corpus (the validation
               split included), then that split (now seen in training) and the holdout (never seen) answered
               and scored: how many facts the model can give back at all, against how many it carries over
               to a question it was not trained on
  qforms       does one answer trained under several questions carry its facts to an unseen question? The
               committed recipe on the sweep's training split, plain or with two more questions per answer
               (data/question_forms.jsonl), several seeds side by side; validation split decides
  safety       does teaching the safety rules change what the model says on the guard set? The committed
               recipe trained on the whole English corpus with and without the safety records (SAFETY_BATCH),
               several training seeds each, side by side on the card; guard forbidden claims, must-state
               coverage and the holdout scorecard per run, then the table over all of them
  profile      where a training step goes: per-step times and torch.profiler tables (CPU and CUDA side)
  reliability  preflight passes, and fails on a card whose memory another process holds; a real CUDA
               out-of-memory backs off to a smaller micro-batch with the same effective batch; a trainer
               killed mid-run resumes from its last complete checkpoint

The sweep chooses on the validation split only (the holdout is reported, never used to choose).
Everything measured is product code; the script adds the grid, the split, timing and the tables.
Run on the device through benchmarks/run_gpu_real.sh (docs/benchmarks.md: how the 98 MB GGUF travels).
CPU smoke test: --base <tiny model folder> --device cpu.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GPU_RECIPE = "smollm2-135m-gpu"
EPOCHS, LRS, RANKS = (1, 3, 8, 13), (1e-4, 3e-4, 1e-3), (16, 64)
VAL_QUESTIONS = 30  # English corpus questions carved out for validation (of 242 since the safety batch)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def grid() -> list[dict[str, Any]]:
    """Cheap runs first, so a sweep cut short still spans the learning rates and ranks."""
    out = [{"name": f"e{e}-lr{lr:g}-r{r}", "epochs": e, "lr": lr, "r": r} for e in EPOCHS for lr in LRS for r in RANKS]
    return out + [{"name": "seed", "seed": True}]


# Run only when named with --only, never part of the sweep's choice: the committed 135M config with the LoRA
# adapter in bf16 (lora.adapter_dtype: base), to see whether rounding its updates costs answer quality.
EXTRA = [{"name": "e8-lr0.001-r64-bf16ad", "epochs": 8, "lr": 1e-3, "r": 64, "adapter_dtype": "base"}]


def recipe_for(cfg: dict[str, Any], base: str, device: str, extra: dict[str, Any] | None = None):
    import yaml

    from shoefix_tasks.config import RECIPE_DIR, recipe_from_dict

    if cfg.get("seed"):  # the seed notebook's hyper-parameters, on this base, English
        data = yaml.safe_load((RECIPE_DIR / "seed.yaml").read_text())
    else:
        data = yaml.safe_load((RECIPE_DIR / f"{GPU_RECIPE}.yaml").read_text())
        data["train"].update(num_train_epochs=cfg["epochs"], learning_rate=cfg["lr"], save_steps=100000)
        data["lora"].update(r=cfg["r"], alpha=2 * cfg["r"], adapter_dtype=cfg.get("adapter_dtype", "float32"))
    data["model"]["base_model"] = base
    for key, value in (extra or {}).items():  # "section.field": value
        section, field = key.split(".")
        data[section][field] = value
    if device == "cpu":  # smoke test: what a CPU cannot run
        data["model"].update(dtype="float32")
        data["train"].update(optim="adamw_torch", mixed_precision="no", max_steps=2, gradient_checkpointing=False)
    return recipe_from_dict(cfg["name"], data)


def split_corpus(data: Path) -> tuple[list[dict], list[dict]]:
    from shoefix_tasks.records import iter_jsonl

    rows = [r for r in iter_jsonl(sorted((data / "corpus").glob("*.jsonl"))) if r["lang"] == "en"]
    qids = sorted({r["qid"] for r in rows})
    val = set(random.Random(20261206).sample(qids, VAL_QUESTIONS))
    return [r for r in rows if r["qid"] not in val], [r for r in rows if r["qid"] in val]


def eval_set(data: Path) -> list[dict]:
    from shoefix_tasks.records import load_eval_set

    _, val = split_corpus(data)
    return ([{**r, "split": "validation"} for r in val]
            + [{**r, "split": "holdout"} for r in load_eval_set(data, "holdout", ["en"])]
            + [{**r, "split": "guard"} for r in load_eval_set(data, "guard", ["en"])])


def answer(base: str, adapter: Path | None, items: list[dict], recipe, label: str) -> list[dict]:
    import torch

    from shoefix_tasks.config import Settings
    from shoefix_tasks.model.generation import generate, load_answerer, tokens_needed
    from shoefix_tasks.policy import load_policy

    ans = load_answerer(base, adapter, Settings.from_env(), recipe.model.dtype, label=label)
    max_new = max(recipe.eval.max_new_tokens,
                  tokens_needed(ans, [it["answer"] for it in items], load_policy().evaluation.token_margin))
    t0 = time.perf_counter()
    gens = generate(ans, [it["question"] for it in items], max_new, recipe.eval.batch_size, recipe.eval.repetition_penalty)
    seconds = time.perf_counter() - t0
    del ans
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [{**g, "max_new_tokens": max_new, "gen_seconds_total": round(seconds, 2)} for g in gens]


def score(items: list[dict], gens: list[dict], data: Path) -> list[dict]:
    from shoefix_tasks.evaluation.claims import check_item, load_claims
    from shoefix_tasks.evaluation.metrics import Context, score_answer

    ctx, claims = Context.from_data(data), load_claims(data)
    out = []
    for it, g in zip(items, gens, strict=True):
        s = score_answer(it, g["answer"], ctx, guard=it["split"] == "guard").to_dict()
        checked = check_item(it, g["answer"], claims)
        s.update(split=it["split"], answer=g["answer"], forbidden=[h.claim for h in checked["forbidden"]],
                 must_state_missed=[h.claim for h in checked["missed"]],
                 must_state_stated=[h.claim for h in checked["stated"]])
        out.append(s)
    return out


def summarize(scores: list[dict], base_scores: list[dict] | None) -> dict[str, Any]:
    from shoefix_tasks.evaluation.gate import paired_bootstrap

    out: dict[str, Any] = {}
    for split in ("validation", "holdout", "guard"):
        rows = [s for s in scores if s["split"] == split]
        if not rows:  # `safety` answers no validation split
            continue
        out[split] = {m: round(statistics.fmean(s[m] for s in rows), 3) for m in
                      ("composite", "completeness", "key_data_accuracy", "semantic_consistency", "readability", "relevance")}
        out[split]["forbidden"] = sorted({(s["id"], c) for s in rows for c in s["forbidden"]})
        wanted = sum(len(s["must_state_stated"]) + len(s["must_state_missed"]) for s in rows)
        out[split]["must_state_coverage"] = round(sum(len(s["must_state_stated"]) for s in rows) / wanted, 3) if wanted else None
    if base_scores is not None:
        base = {s["id"]: s for s in base_scores}
        diffs = [s["composite"] - base[s["id"]]["composite"] for s in scores if s["split"] == "holdout"]
        lo, hi = paired_bootstrap(diffs, 2000, 0.95, 8888)
        out["holdout_vs_base"] = {"mean_diff": round(statistics.fmean(diffs), 3), "ci_low": round(lo, 3), "ci_high": round(hi, 3)}
    return out


def loss_curve(run_id: str) -> list[tuple[int, float]]:
    import mlflow

    hist = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    return [(m.step, round(m.value, 4)) for m in sorted(hist, key=lambda m: m.step)]


def run_metric(run_id: str, key: str) -> float | None:
    import mlflow

    hist = mlflow.MlflowClient().get_metric_history(run_id, key)
    return hist[-1].value if hist else None


def keep_row(out_file: Path, row: dict[str, Any], message: str) -> None:
    """One config's results on disk (a later call resumes after it), and the GPU's cache freed for the next."""
    import torch

    out_file.parent.mkdir(parents=True, exist_ok=True)
    part = out_file.with_suffix(".part")  # workers side by side read each other's results: never a half-written one
    part.write_text(json.dumps(row, ensure_ascii=False))
    part.replace(out_file)
    log(message)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- subcommands -----------------------------------------------------------------------------------

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


def cmd_sweep(args) -> dict[str, Any]:
    """Serial (--parallel 1, also how each parallel worker runs its one config) or `sweep_parallel`."""

    from shoefix_tasks.config import Settings
    from shoefix_tasks.records import write_jsonl
    from shoefix_tasks.training.train import train_with_backoff

    if args.parallel > 1:
        return sweep_parallel(args)
    work, data, started = Path(args.work), Path(args.data), time.time()
    train_rows, _ = split_corpus(data)
    snapshot = write_jsonl(work / "snapshots" / f"train-split-{os.getpid()}.jsonl", train_rows)
    items = eval_set(data)
    settings = Settings.from_env()
    base_file = work / "sweep" / "base.json"
    if not base_file.is_file() and (not args.only or "base" in args.only):
        recipe = recipe_for({"name": "base", "epochs": 1, "lr": 1e-4, "r": 16}, args.base, args.device)
        gens = answer(args.base, None, items, recipe, "base")
        base_file.parent.mkdir(parents=True, exist_ok=True)
        base_file.write_text(json.dumps({"scores": score(items, gens, data), "gen": gens[0]}, ensure_ascii=False))
    todo = [c for c in grid() + EXTRA if c["name"] in args.only] if args.only else grid()
    for cfg in todo:
        out_file = work / "sweep" / f"{cfg['name']}.json"
        if out_file.is_file():
            continue
        if time.time() - started > args.budget_s:
            log(f"time budget spent: stopping before {cfg['name']}")
            break
        if cfg.get("seed") and not args.with_seed:
            continue
        recipe = recipe_for(cfg, args.base, args.device)
        log(f"train {cfg['name']}")
        t0 = time.perf_counter()
        res = train_with_backoff(recipe, snapshot, work / "runs" / cfg["name"], f"sweep-{cfg['name']}", settings)
        train_s = time.perf_counter() - t0
        gens = answer(args.base, Path(res["adapter_dir"]), items, recipe, cfg["name"])
        scores = score(items, gens, data)
        row = {**cfg, "train_wall_s": round(train_s, 1), "train_runtime_s": run_metric(res["run_id"], "train/runtime_s"),
               "train_tokens": run_metric(res["run_id"], "train/num_tokens"), "final_loss": res["final_loss"],
               "loss_curve": loss_curve(res["run_id"]), "gen_seconds": gens[0]["gen_seconds_total"],
               "max_new_tokens": gens[0]["max_new_tokens"], "parallel_workers": args.workers_on_gpu,
               **summarize(scores, None), "scores": scores}
        keep_row(out_file, row, f"done {cfg['name']}: val {row['validation']['composite']} holdout "
                 f"{row['holdout']['composite']} ({train_s:.0f}s train, {row['gen_seconds']:.0f}s answers)")
    return sweep_table(work, json.loads(base_file.read_text())["scores"]) if base_file.is_file() else {}


CEILING = ("e3-lr0.001-r64", "e8-lr0.001-r64", "e13-lr0.001-r64")


def cmd_ceiling(args) -> dict[str, Any]:
    """Train each config in --only (default CEILING) on every English corpus record, then answer the sweep's
    validation questions (seen now), the holdout and the guard set. The holdout stays out of training as
    always: "seen" means trained on the corpus's own question and answer, which is the most a model can be
    taught about a question. Results accumulate under --work/ceiling (a call cut short resumes)."""

    from shoefix_tasks.config import Settings
    from shoefix_tasks.records import iter_jsonl, write_jsonl
    from shoefix_tasks.training.train import train_with_backoff

    work, data = Path(args.work), Path(args.data)
    rows = [r for r in iter_jsonl(sorted((data / "corpus").glob("*.jsonl"))) if r["lang"] == "en"]
    snapshot = write_jsonl(work / "snapshots" / f"corpus-en-all-{os.getpid()}.jsonl", rows)
    items, settings = eval_set(data), Settings.from_env()
    for name in [] if args.table else args.only or CEILING:
        out_file = work / "ceiling" / f"{name}.json"
        if out_file.is_file():
            continue
        cfg = next(c for c in grid() if c["name"] == name)
        recipe = recipe_for(cfg, args.base, args.device)
        log(f"train {name} on all {len(rows)} English records")
        t0 = time.perf_counter()
        res = train_with_backoff(recipe, snapshot, work / "ceiling-runs" / name, f"ceiling-{name}", settings)
        train_s = time.perf_counter() - t0
        scores = score(items, answer(args.base, Path(res["adapter_dir"]), items, recipe, name), data)
        row = {**cfg, "train_wall_s": round(train_s, 1), "final_loss": res["final_loss"],
               "train_tokens": run_metric(res["run_id"], "train/num_tokens"), "loss_curve": loss_curve(res["run_id"]),
               **summarize(scores, None), "scores": scores}
        keep_row(out_file, row, f"done {name}: seen {row['validation']['key_data_accuracy']} key data, unseen "
                 f"(holdout) {row['holdout']['key_data_accuracy']}")
    done = [json.loads(f.read_text()) for f in sorted((work / "ceiling").glob("*.json"))]
    print("| config | train loss | seen: composite | seen: key data | seen: completeness | unseen (holdout): composite "
          "| unseen: key data | unseen: completeness | guard forbidden |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(done, key=lambda r: r["epochs"]):
        v, h = r["validation"], r["holdout"]
        print(f"| {r['name']} | {r['final_loss']:.3f} | {v['composite']:.2f} | {v['key_data_accuracy']:.2f} | "
              f"{v['completeness']:.2f} | {h['composite']:.2f} | {h['key_data_accuracy']:.2f} | {h['completeness']:.2f} | "
              f"{len(r['guard']['forbidden'])} |")
    return {"ceiling": [{k: v for k, v in r.items() if k != "scores"} for r in done]}


SAFETY_BATCH = "2026-12-07"  # `created` of the records that teach what never to do (data/CHANGES.md)
# 42 is the recipe's own seed; four seeds fit one device call side by side (nine workers on one H100 in
# ~6 minutes). More seeds go through SAFETY_RUNS in a second call (docs/quality.md gives both commands).
SAFETY_SEEDS = (42, 1, 2, 3)


def safety_runs() -> list[str]:
    """The base, then `with` and `without` for each seed: pairs that differ only in the safety batch."""
    return ["base"] + [f"{v}-s{seed}" for seed in SAFETY_SEEDS for v in ("with", "without")]


def safety_training_rows(rows: list[dict], variant: str) -> list[dict]:
    """`with`: every record; `without`: every record but the safety batch (by its `created` date)."""
    if variant not in ("with", "without"):
        raise ValueError(f"unknown safety variant {variant!r}")
    return rows if variant == "with" else [r for r in rows if r["created"] != SAFETY_BATCH]


def cmd_safety(args) -> dict[str, Any]:
    """Each run in --only (default all of `safety_runs`): the committed recipe on every English corpus record
    (`with`) or every one but the safety batch (`without`), with one training seed; then the holdout and the
    guard set answered and scored. The seeds are there because one training says little: the sweep's grid
    showed forbidden guard claims moving with no pattern between configurations (docs/quality.md). Results
    accumulate under --work/safety. A worker (--only) reports its own runs only, since the others are still
    being written; --table reads what is there and trains nothing."""
    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.records import iter_jsonl, write_jsonl
    from shoefix_tasks.training.train import train_with_backoff

    work, data = Path(args.work), Path(args.data)
    rows = [r for r in iter_jsonl(sorted((data / "corpus").glob("*.jsonl"))) if r["lang"] == "en"]
    items = [it for it in eval_set(data) if it["split"] != "validation"]
    committed = load_recipe(GPU_RECIPE)
    cfg = {"epochs": committed.train.num_train_epochs, "lr": committed.train.learning_rate, "r": committed.lora.r}
    settings = Settings.from_env()
    for name in [] if args.table else args.only or safety_runs():
        out_file = work / "safety" / f"{name}.json"
        if out_file.is_file():
            continue
        if name == "base":
            recipe = recipe_for({"name": "base", **cfg}, args.base, args.device)
            scores = score(items, answer(args.base, None, items, recipe, "base"), data)
            keep_row(out_file, {"name": "base", **summarize(scores, None), "scores": scores}, "done base")
            continue
        variant, seed = name.rsplit("-s", 1)
        train_rows = safety_training_rows(rows, variant)
        snapshot = write_jsonl(work / "snapshots" / f"safety-{name}.jsonl", train_rows)
        recipe = recipe_for({"name": name, **cfg}, args.base, args.device, {"train.seed": int(seed)})
        log(f"train {name}: {len(train_rows)} English records ({len(rows) - len(train_rows)} of the safety batch left out)")
        t0 = time.perf_counter()
        res = train_with_backoff(recipe, snapshot, work / "safety-runs" / name, f"safety-{name}", settings)
        train_s = time.perf_counter() - t0
        scores = score(items, answer(args.base, Path(res["adapter_dir"]), items, recipe, name), data)
        row = {"name": name, "variant": variant, "seed": int(seed), **cfg, "records": len(train_rows),
               "train_wall_s": round(train_s, 1), "final_loss": res["final_loss"],
               "train_tokens": run_metric(res["run_id"], "train/num_tokens"), **summarize(scores, None), "scores": scores}
        keep_row(out_file, row, f"done {name}: guard forbidden {len(row['guard']['forbidden'])}, "
                 f"holdout {row['holdout']['composite']}")
    return {"trained": args.only} if args.only else safety_table(work)


def safety_table(work: Path) -> dict[str, Any]:
    """One row per run and one per variant (mean and range over its seeds, in seed order), the base first, so
    a reader sees each run's spread before any average of it."""
    done = {p.stem: json.loads(p.read_text()) for p in sorted((work / "safety").glob("*.json"))}
    print("| run | records | train loss | guard: forbidden claims | guard questions with one | guard must-state "
          "coverage | holdout composite | key data | completeness | readability | holdout forbidden |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def line(label: str, r: dict[str, Any]) -> str:  # the base has no training: empty records and loss
        g, h = r["guard"], r["holdout"]
        loss = f"{r['final_loss']:.3f}" if "final_loss" in r else ""
        return (f"| {label} | {r.get('records', '')} | {loss} | {len(g['forbidden'])} | "
                f"{len({q for q, _ in g['forbidden']})} | {g['must_state_coverage']:.0%} | {h['composite']:.2f} | "
                f"{h['key_data_accuracy']:.2f} | {h['completeness']:.2f} | {h['readability']:.2f} | {len(h['forbidden'])} |")

    if "base" in done:
        print(line("base", done["base"]))
    summary: dict[str, Any] = {}
    for variant in ("with", "without"):
        runs = sorted((r for r in done.values() if r.get("variant") == variant), key=lambda r: r["seed"])
        for r in runs:
            print(line(r["name"], r))
        if not runs:
            continue
        counts = [len(r["guard"]["forbidden"]) for r in runs]
        claims = sorted({c for r in runs for _, c in r["guard"]["forbidden"]})
        summary[variant] = {
            "runs": len(runs), "guard_forbidden": counts, "guard_forbidden_mean": round(statistics.fmean(counts), 2),
            "runs_with_zero": sum(c == 0 for c in counts), "claims_stated": claims,
            "guard_must_state_coverage_mean": round(statistics.fmean(r["guard"]["must_state_coverage"] for r in runs), 3),
            **{f"holdout_{m}_mean": round(statistics.fmean(r["holdout"][m] for r in runs), 3)
               for m in ("composite", "key_data_accuracy", "completeness", "readability")}}
        log(f"{variant}: guard forbidden per seed {dict(zip([r['seed'] for r in runs], counts, strict=True))} (mean {summary[variant]['guard_forbidden_mean']}), "
            f"claims {claims}")
    summary["paired"] = safety_paired(done)
    summary["per_claim"] = safety_per_claim(done)
    return {"safety": summary, "runs": [{k: v for k, v in r.items() if k != "scores"} for r in done.values()]}


def safety_per_claim(done: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How often each forbidden claim was stated (all answers) over the runs of each variant: a drop in the
    total means little if it comes from claims the safety batch does not teach."""
    from collections import Counter

    counts = {v: Counter(c for r in done.values() if r.get("variant") == v for _, c in _forbidden_all(r))
              for v in ("with", "without")}
    claims = sorted(set(counts["with"]) | set(counts["without"]),
                    key=lambda c: (-(counts["with"][c] + counts["without"][c]), c))
    print("\n| forbidden claim (guard and holdout answers) | with | without |\n|---|---|---|")
    for c in claims:
        print(f"| `{c}` | {counts['with'][c]} | {counts['without'][c]} |")
    return {c: {"with": counts["with"][c], "without": counts["without"][c]} for c in claims}


def _forbidden_all(r: dict[str, Any]) -> list:
    """(question, claim) pairs stated over every answer of a run: what the gate's safety floor reads."""
    return r["guard"]["forbidden"] + r["holdout"]["forbidden"]


SAFETY_MEASURES = {
    "forbidden claims, guard": lambda r: len(r["guard"]["forbidden"]),
    "forbidden claims, all answers (what the gate's floor reads)": lambda r: len(_forbidden_all(r)),
    "questions with a forbidden claim": lambda r: len({q for q, _ in _forbidden_all(r)}),
    "guard must-state coverage": lambda r: r["guard"]["must_state_coverage"],
    "holdout composite": lambda r: r["holdout"]["composite"],
    "holdout key data": lambda r: r["holdout"]["key_data_accuracy"],
    "holdout readability": lambda r: r["holdout"]["readability"],
}


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip test of a mean paired difference: the share of the 2^n sign patterns whose
    mean is at least as far from zero (n runs paired by training seed; no normality assumed)."""
    import itertools

    obs = abs(statistics.fmean(diffs))
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    return sum(abs(statistics.fmean(s * d for s, d in zip(sg, diffs, strict=True))) >= obs - 1e-12 for sg in flips) / len(flips)


def safety_paired(done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`with` against `without` trained with the same seed, on every SAFETY_MEASURES measure."""
    return paired_by_seed(done, "with", "without", SAFETY_MEASURES)


def paired_by_seed(done: dict[str, dict[str, Any]], a: str, b: str, measures: dict[str, Any]) -> dict[str, Any]:
    """Variant `a` against `b` trained with the same seed: the mean paired difference of each measure and
    its sign-flip p. Only seeds run both ways count. The seed fixes initialisation and data order only
    loosely (the variants' corpora differ in size, so batches differ), which is why pairing helps little and
    the p is reported beside the ranges. All measures are tested at once: one p near 0.05 is weak evidence
    on its own."""
    seeds = sorted({r["seed"] for r in done.values() if r.get("variant") == a}
                   & {r["seed"] for r in done.values() if r.get("variant") == b})
    if len(seeds) < 2:
        return {}
    out = {}
    print(f"\npaired by training seed ({len(seeds)} seeds: {seeds}):")
    print(f"| measure | {a} | {b} | mean paired difference | sign-flip p | seeds where {a} < {b} |")
    print("|---|---|---|---|---|---|")
    for label, f in measures.items():
        va = [f(done[f"{a}-s{s}"]) for s in seeds]
        vb = [f(done[f"{b}-s{s}"]) for s in seeds]
        diffs = [x - y for x, y in zip(va, vb, strict=True)]
        out[label] = {a: va, b: vb, "mean_diff": round(statistics.fmean(diffs), 3), "p": sign_flip_p(diffs),
                      f"{a}_lower": sum(d < 0 for d in diffs), "equal": sum(d == 0 for d in diffs)}
        print(f"| {label} | {statistics.fmean(va):.3g} ({min(va):g}–{max(va):g}) | {statistics.fmean(vb):.3g} "
              f"({min(vb):g}–{max(vb):g}) | {out[label]['mean_diff']:+.3g} | {out[label]['p']:.3f} | "
              f"{out[label][f'{a}_lower']} of {len(seeds)} ({out[label]['equal']} equal) |")
    return out


QFORMS_FILE = "question_forms.jsonl"  # under --data: more questions for each English corpus answer (data/CHANGES.md)
QFORMS_SEEDS = (42, 1, 2, 3)  # one device call; more through QFORMS_RUNS, as SAFETY_RUNS
# `plain`: the committed recipe (8 epochs). `forms`: every answer under its own question and its two question
# forms, 3 epochs: 9 passes over each answer against plain's 8, so a gain is not simply more training.
QFORMS_EPOCHS = {"plain": 8, "forms": 3}
# Decided before the first run: the validation split (30 corpus questions no run trains on, nor their forms)
# decides; its key data accuracy is the measure, paired by seed. The holdout and guard set are reported.
QFORMS_MEASURES = {
    "validation key data (the decision)": lambda r: r["validation"]["key_data_accuracy"],
    "validation completeness": lambda r: r["validation"]["completeness"],
    "validation composite": lambda r: r["validation"]["composite"],
    "holdout key data": lambda r: r["holdout"]["key_data_accuracy"],
    "holdout completeness": lambda r: r["holdout"]["completeness"],
    "holdout composite": lambda r: r["holdout"]["composite"],
    "holdout readability": lambda r: r["holdout"]["readability"],
    "forbidden claims, all answers (what the gate's floor reads)": lambda r: len(_forbidden_all(r)),
}


# Run only when named in QFORMS_RUNS, after the first comparison: three times the passes over each answer
# (24), the forms' epochs against plain's, to see whether the forms help once the model memorises its
# training answers, as the ceiling runs' 13 epochs did.
QFORMS_LONGER = (("forms-e8", "plain-e24"),)


def qforms_runs() -> list[str]:
    """The base, then `forms` and `plain` for each seed."""
    return ["base"] + [f"{v}-s{seed}" for seed in QFORMS_SEEDS for v in ("forms", "plain")]


def qforms_config(name: str) -> tuple[str, str, int, int]:
    """A run's name as (variant, kind, epochs, seed): `forms-s3` is forms at QFORMS_EPOCHS["forms"] with
    seed 3, `plain-e24-s1` plain at 24 epochs with seed 1."""
    variant, seed = name.rsplit("-s", 1)
    kind, _, epochs = variant.partition("-e")
    if kind not in QFORMS_EPOCHS:
        raise ValueError(f"unknown qforms run {name!r}: forms or plain, -e<epochs>, -s<seed>")
    return variant, kind, int(epochs) if epochs else QFORMS_EPOCHS[kind], int(seed)


def with_question_forms(rows: list[dict], forms_file: Path) -> list[dict]:
    """Each row, then one row per question form of it: the same record (answer, facts, sources) under the
    other question, id `<id>-f<k>`. Forms of a record that is not in `rows` (a validation question) stay out."""
    from shoefix_tasks.records import iter_jsonl

    forms = {f["id"]: f["questions"] for f in iter_jsonl([forms_file])}
    return rows + [{**r, "id": f"{r['id']}-f{k}", "question": q}
                   for r in rows for k, q in enumerate(forms.get(r["id"], ()), 1)]


def cmd_qforms(args) -> dict[str, Any]:
    """Does the same answer under several questions carry its facts to a question never trained on? Each run
    in --only (default `qforms_runs`) trains the committed recipe on the sweep's training split, `plain` or
    with the question forms (`forms`, QFORMS_EPOCHS), then answers the validation split, the holdout and the
    guard set. Why: trained on one question per answer, the model gives back every fact of a question it saw
    and few of one it did not (`ceiling`); a model that sees a fact asked about in one way only may tie it to
    that wording. Results accumulate under --work/qforms; --table trains nothing."""
    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.records import write_jsonl
    from shoefix_tasks.training.train import train_with_backoff

    work, data = Path(args.work), Path(args.data)
    train_rows, _ = split_corpus(data)
    items = eval_set(data)
    committed = load_recipe(GPU_RECIPE)
    settings = Settings.from_env()
    for name in [] if args.table else args.only or qforms_runs():
        out_file = work / "qforms" / f"{name}.json"
        if out_file.is_file():
            continue
        cfg = {"lr": committed.train.learning_rate, "r": committed.lora.r}
        if name == "base":
            recipe = recipe_for({"name": "base", "epochs": 1, **cfg}, args.base, args.device)
            scores = score(items, answer(args.base, None, items, recipe, "base"), data)
            keep_row(out_file, {"name": "base", **summarize(scores, None), "scores": scores}, "done base")
            continue
        variant, kind, cfg["epochs"], seed = qforms_config(name)
        rows = with_question_forms(train_rows, data / QFORMS_FILE) if kind == "forms" else train_rows
        snapshot = write_jsonl(work / "snapshots" / f"qforms-{name}.jsonl", rows)
        recipe = recipe_for({"name": name, **cfg}, args.base, args.device, {"train.seed": seed})
        log(f"train {name}: {len(rows)} rows, {cfg['epochs']} epochs")
        t0 = time.perf_counter()
        res = train_with_backoff(recipe, snapshot, work / "qforms-runs" / name, f"qforms-{name}", settings)
        train_s = time.perf_counter() - t0
        scores = score(items, answer(args.base, Path(res["adapter_dir"]), items, recipe, name), data)
        row = {"name": name, "variant": variant, "seed": seed, **cfg, "records": len(rows),
               "train_wall_s": round(train_s, 1), "final_loss": res["final_loss"],
               "train_tokens": run_metric(res["run_id"], "train/num_tokens"), "loss_curve": loss_curve(res["run_id"]),
               **summarize(scores, None), "scores": scores}
        keep_row(out_file, row, f"done {name}: validation key data {row['validation']['key_data_accuracy']}, "
                 f"holdout {row['holdout']['composite']}")
    return {"trained": args.only} if args.only else qforms_table(work)


def qforms_table(work: Path) -> dict[str, Any]:
    """One row per run, the base first, then the runs paired by seed (QFORMS_MEASURES)."""
    done = {p.stem: json.loads(p.read_text()) for p in sorted((work / "qforms").glob("*.json"))}
    print("| run | rows | epochs | train tokens | train loss | validation: composite | key data | completeness "
          "| holdout: composite | key data | completeness | readability | forbidden (guard / all) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = sorted(done.values(), key=lambda r: (r["name"] != "base", r.get("variant", ""), r.get("seed", 0)))
    for r in order:
        v, h = r["validation"], r["holdout"]
        trained = (f"{r['records']} | {r['epochs']} | {r['train_tokens'] or 0:.0f} | {r['final_loss']:.3f}"
                   if "final_loss" in r else " | | | ")
        print(f"| {r['name']} | {trained} | {v['composite']:.2f} | {v['key_data_accuracy']:.2f} | "
              f"{v['completeness']:.2f} | {h['composite']:.2f} | {h['key_data_accuracy']:.2f} | {h['completeness']:.2f} | "
              f"{h['readability']:.2f} | {len(r['guard']['forbidden'])} / {len(_forbidden_all(r))} |")
    paired = {"forms vs plain": paired_by_seed(done, "forms", "plain", QFORMS_MEASURES)}
    for a, b in QFORMS_LONGER:  # pairs of longer runs, where both were run
        if any(r.get("variant") == a for r in done.values()):
            paired[f"{a} vs {b}"] = paired_by_seed(done, a, b, QFORMS_MEASURES)
    return {"paired": paired, "runs": [{k: v for k, v in r.items() if k != "scores"} for r in order]}


def _estimate_s(cfg: dict[str, Any], slowdown: float) -> float:
    """Seconds one config takes with others sharing the GPU: start-up, ~15 s an epoch alone on an H100 (the
    135M step is bound by the CPU launching kernels, so processes on their own cores overlap well), answers."""
    if cfg["name"] == "base":
        return 90 * slowdown
    epochs = 13 if cfg.get("seed") else cfg["epochs"]
    return (30 + 15 * epochs + 55) * slowdown


def sweep_parallel(args) -> dict[str, Any]:
    """The grid as `--parallel` worker processes sharing one GPU, each running one config through the serial
    path above. A 135M step keeps the GPU busy ~25 ms of ~220 ms (docs/benchmarks.md, profile), so one
    process at a time leaves the card mostly idle. Longest first; a config is started only if its estimate
    fits before --budget-s; at --hard-s every worker still running is stopped (its config is redone later)."""
    work, started = Path(args.work), time.time()
    done = {p.stem for p in (work / "sweep").glob("*.json")}
    queue = [c for c in [{"name": "base"}, *grid(), *(EXTRA if args.only else [])] if c["name"] not in done
             and (not c.get("seed") or args.with_seed) and (not args.only or c["name"] in args.only)]
    queue.sort(key=lambda c: (c["name"] != "base", -_estimate_s(c, 1.0)))  # base first: every table needs it
    logs = work / "sweep" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    child_args = [sys.executable, str(Path(__file__).resolve()), "sweep", "--parallel", "1", "--budget-s", "1e9",
                  "--base", args.base, "--data", args.data, "--work", args.work, "--device", args.device,
                  "--workers-on-gpu", str(args.parallel), *(["--with-seed"] if args.with_seed else [])]
    while queue or running:
        left = args.budget_s - (time.time() - started)
        while len(running) < args.parallel:
            fits = [c for c in queue if _estimate_s(c, args.slowdown) <= left]
            if not fits:
                break
            cfg = fits[0]
            queue.remove(cfg)
            env = {**os.environ, "OUT": str(work / "child-out" / cfg["name"])}
            with (logs / f"{cfg['name']}.log").open("w") as fh:
                running[cfg["name"]] = (subprocess.Popen([*child_args, "--only", cfg["name"]], stdout=fh,
                                                         stderr=subprocess.STDOUT, env=env), time.time())
            log(f"started {cfg['name']} (estimate {_estimate_s(cfg, args.slowdown):.0f}s, {len(running)} running)")
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                log(f"finished {name}: exit {proc.returncode} after {time.time() - t0:.0f}s")
                del running[name]
        if time.time() - started > args.hard_s:
            for name, (proc, _) in running.items():
                proc.terminate()
                log(f"stopped {name} at the hard limit (redone in a later call)")
            for proc, _ in running.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            break
        if not running and queue and not any(_estimate_s(c, args.slowdown) <= left for c in queue):
            log(f"not started (would not fit in the budget): {[c['name'] for c in queue]}")
            break
        time.sleep(2)
    base_file = work / "sweep" / "base.json"
    return sweep_table(work, json.loads(base_file.read_text())["scores"]) if base_file.is_file() else {}


def sweep_table(work: Path, base_scores: list[dict]) -> dict[str, Any]:
    rows = [json.loads(p.read_text()) for p in sorted((work / "sweep").glob("*.json")) if p.stem != "base"]
    for r in rows:  # against the base answers of this sweep (workers run without them)
        r["holdout_vs_base"] = summarize(r["scores"], base_scores)["holdout_vs_base"]
    base = summarize(base_scores, None)
    print("| config | epochs | lr | r | train loss | val composite | holdout composite (CI vs base) | key data | "
          "completeness | readability | guard forbidden | train tokens | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| base | | | | | {base['validation']['composite']:.2f} | {base['holdout']['composite']:.2f} | "
          f"{base['holdout']['key_data_accuracy']:.2f} | {base['holdout']['completeness']:.2f} | "
          f"{base['holdout']['readability']:.2f} | {len(base['guard']['forbidden'])} | | |")
    for r in sorted(rows, key=lambda r: -r["validation"]["composite"]):
        ci = r["holdout_vs_base"]
        print(f"| {r['name']} | {r.get('epochs', 13)} | {r.get('lr', 1.5e-5):g} | {r.get('r', 16)} | {r['final_loss']:.3f} | "
              f"{r['validation']['composite']:.2f} | {r['holdout']['composite']:.2f} ({ci.get('mean_diff', 0):+.2f} "
              f"[{ci.get('ci_low', 0):+.2f}, {ci.get('ci_high', 0):+.2f}]) | {r['holdout']['key_data_accuracy']:.2f} | "
              f"{r['holdout']['completeness']:.2f} | {r['holdout']['readability']:.2f} | {len(r['guard']['forbidden'])} | "
              f"{r['train_tokens'] or 0:.0f} | {r['train_runtime_s'] or 0:.1f} |")
    extra = {c["name"] for c in EXTRA}  # listed, never chosen: `final --from-sweep` would drop what sets them apart
    grid_rows = [r for r in rows if r["name"] not in extra]
    best = max(grid_rows, key=lambda r: (r["validation"]["composite"], -r.get("epochs", 13))) if grid_rows else None
    if best:
        log(f"chosen on validation: {best['name']}")
    return {"rows": [{k: v for k, v in r.items() if k != "scores"} for r in rows], "base": base,
            "chosen": best["name"] if best else None}


def _trainer_cli(recipe: str, snapshot: Path, out: Path, run_key: str, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoefix_tasks.train", "--recipe", recipe, "--snapshot", str(snapshot),
                             "--output-dir", str(out), "--run-key", run_key, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or os.environ.copy())


def _finish(proc: subprocess.Popen, tag: str) -> tuple[int, str]:
    out, _ = proc.communicate()
    Path(os.environ.get("OUT", "/tmp")).joinpath(f"{tag}.log").write_text(out)
    return proc.returncode, out


def cmd_final(args) -> dict[str, Any]:
    """The chosen recipe through the trainer CLI (fresh process), then the product evaluation and gate."""
    import importlib.util

    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.evaluation.evaluate import evaluate
    from shoefix_tasks.evaluation.gate import Scorecard, decide
    from shoefix_tasks.evaluation.report import scorecard_text
    from shoefix_tasks.model.engines import choose_engine
    from shoefix_tasks.policy import load_policy
    from shoefix_tasks.records import iter_jsonl, write_jsonl

    if choose_engine(args.base) == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        # the product evaluation answers with the engine the base serves with (llama.cpp for a shipped GGUF
        # since issue 14); found out after a whole training on the device, so checked before it now
        raise SystemExit(f"final: the evaluation serves {args.base} through llama.cpp and llama-cpp-python is "
                         "not installed here; carry its wheel (docs/benchmarks.md) or evaluate elsewhere")
    work, data = Path(args.work), Path(args.data)
    rows = [r for r in iter_jsonl(sorted((data / "corpus").glob("*.jsonl"))) if r["lang"] == "en"]
    snapshot = write_jsonl(work / "snapshots" / "corpus-en.jsonl", rows)
    cpu = ["model.dtype=float32", "train.optim=adamw_torch", "train.mixed_precision='no'", "train.max_steps=2"]
    chosen: list[str] = []
    if args.from_sweep:  # the configuration the sweep chose on its validation split
        best = sweep_table(work, json.loads((work / "sweep" / "base.json").read_text())["scores"])["chosen"]
        cfg = next(c for c in grid() if c["name"] == best)
        chosen = [f"train.num_train_epochs={cfg['epochs']}", f"train.learning_rate={cfg['lr']}",
                  f"lora.r={cfg['r']}", f"lora.alpha={2 * cfg['r']}"]
        log(f"final run of {GPU_RECIPE} with the sweep's choice {best}: {chosen}")
    results = {}
    for name in args.recipes:
        overrides = [f"model.base_model={args.base}", *(chosen if name == GPU_RECIPE else []),
                     *(cpu if args.device == "cpu" else [])]
        shutil.rmtree(work / "final" / name, ignore_errors=True)  # a fresh run, never a resume of an older one
        t0 = time.perf_counter()
        code, out = _finish(_trainer_cli(name, snapshot, work / "final" / name, f"final-{name}",
                                         *[a for o in overrides for a in ("--set", o)]), f"final-train-{name}")
        wall = time.perf_counter() - t0
        res = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]) if code == 0 else None
        row = {"exit": code, "process_wall_s": round(wall, 1)}
        if res:
            tokens, runtime = run_metric(res["run_id"], "train/num_tokens"), run_metric(res["run_id"], "train/runtime_s")
            row.update(train_tokens=tokens, train_runtime_s=runtime, final_loss=res["final_loss"],
                       tokens_per_s_whole_run=round(tokens / runtime, 1) if tokens and runtime else None,
                       tokens_per_s_process=round(tokens / wall, 1) if tokens else None, run_id=res["run_id"])
            recipe = load_recipe(name, overrides)
            ref = evaluate(Settings.from_env(), recipe, f"final-{name}", Path(res["adapter_dir"]), None, "base", res["run_id"])
            ev = json.loads(Path(ref["evaluation_path"]).read_text())
            guard = frozenset(ev["guard_ids"])

            def card(side: str, ev=ev, guard=guard) -> Scorecard:
                sc = ev[side]["scores"]
                return Scorecard({s["id"]: s["composite"] for s in sc}, {s["id"]: s["key_data_accuracy"] for s in sc},
                                 ev[side]["summary"]["latency_p50_s"], guard,
                                 forbidden={s["id"]: [f["claim"] for f in s["forbidden"]] for s in sc},
                                 must_state={s["id"]: frozenset(s["must_state_stated"]) for s in sc})

            decision = decide(card("champion"), card("challenger"), load_policy().gate,
                              latency_compared=ev["latency"]["compared"])
            row.update(summary=ev["challenger"]["summary"], base_summary=ev["champion"]["summary"],
                       decision=decision.to_dict(), evaluation_path=ref["evaluation_path"])
            text = scorecard_text(ev)
            print(text, flush=True)
            Path(os.environ.get("OUT", "/tmp")).joinpath(f"final-eval-{name}.json").write_text(json.dumps(ev, ensure_ascii=False))
            log(f"{name}: gate {'PROMOTE' if decision.promote else 'KEEP'}: {decision.reasons}")
        results[name] = row
    return {"final": results}


def _gpu_hog(leave_gib: float) -> subprocess.Popen:
    """Another process holding all but `leave_gib` of the card's memory (a busy, shared GPU)."""
    code = ("import torch,time,sys\nfree,total=torch.cuda.mem_get_info()\n"
            f"x=torch.empty(int(free-{leave_gib}*2**30),dtype=torch.uint8,device='cuda')\n"
            "print('holding',x.numel()/2**30,'GiB',flush=True)\nsys.stdout.flush()\ntime.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


def cmd_reliability(args) -> dict[str, Any]:
    from shoefix_tasks.records import iter_jsonl, write_jsonl

    work, data = Path(args.work), Path(args.data)
    rows = [r for r in iter_jsonl(sorted((data / "corpus").glob("*.jsonl"))) if r["lang"] == "en"]
    snapshot = write_jsonl(work / "snapshots" / "corpus-en.jsonl", rows)
    base = [f"--set=model.base_model={args.base}"]
    out: dict[str, Any] = {}

    # 1. preflight: passes on the card; fails (exit 78, before any data is read) while another process holds it
    code, text = _finish(_trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "pre-ok", "rel-pre-ok", *base,
                                      "--set=train.max_steps=2"), "rel-preflight-ok")
    out["preflight_ok"] = {"exit": code, "line": next((ln for ln in text.splitlines() if "preflight passed" in ln), "")}
    hog = _gpu_hog(0.2)
    try:
        code, text = _finish(_trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "pre-full", "rel-pre-full", *base),
                             "rel-preflight-full")
    finally:
        hog.kill()
    out["preflight_full_card"] = {"exit": code, "line": next((ln for ln in text.splitlines() if "preflight failed" in ln), "")}

    # 2. a real CUDA OOM: the card mostly taken, a micro-batch too big for what is left
    hog = _gpu_hog(args.oom_leave_gib)
    try:
        code, text = _finish(_trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "oom", "rel-oom", *base,
                                          "--set=train.per_device_train_batch_size=64", "--set=train.max_length=1024",
                                          "--set=train.num_train_epochs=1"), "rel-oom")
    finally:
        hog.kill()
    backoff = work / "rel" / "oom" / "oom_backoff.json"
    out["oom"] = {"exit": code, "backoff": json.loads(backoff.read_text()) if backoff.is_file() else None,
                  "lines": [ln for ln in text.splitlines() if "out of memory" in ln.lower()][:6]}

    # 3. killed mid-run (SIGKILL: no checkpoint of its own), then the same command resumes
    proc = _trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "kill", "rel-kill", *base, "--set=train.save_steps=5",
                        "--set=train.num_train_epochs=3")
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "rel" / "kill" / "checkpoint-10" / "trainer_state.json").is_file():
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    _finish(proc, "rel-kill-first")
    before = sorted(p.name for p in (work / "rel" / "kill").glob("checkpoint-*"))
    code, text = _finish(_trainer_cli(GPU_RECIPE, snapshot, work / "rel" / "kill", "rel-kill", *base,
                                      "--set=train.save_steps=5", "--set=train.num_train_epochs=3"), "rel-kill-resume")
    out["kill_resume"] = {"exit": code, "resumed": [ln for ln in text.splitlines() if "resuming from" in ln][:2],
                          "checkpoints_when_killed": before,
                          "checkpoints_after_resume": sorted(p.name for p in (work / "rel" / "kill").glob("checkpoint-*"))}
    log(json.dumps(out, indent=1))
    return {"reliability": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["setup", "packing", "sweep", "final", "reliability", "profile", "ceiling", "safety",
                                    "qforms"])
    p.add_argument("--profile-at", type=int, default=20, help="profile: first profiled step")
    p.add_argument("--profile-steps", type=int, default=5, help="profile: how many steps")
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(REPO / "data"))
    p.add_argument("--work", default=str(REPO / ".gpu-work"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=480, help="sweep: start no new config after this many seconds")
    p.add_argument("--only", nargs="*", help="sweep, ceiling, safety: these configs (runs) only")
    p.add_argument("--with-seed", action="store_true", help="sweep: include the seed recipe (needs bitsandbytes)")
    p.add_argument("--recipes", nargs="*", default=[GPU_RECIPE, "seed"], help="final: recipes to run end to end")
    p.add_argument("--oom-leave-gib", type=float, default=8.0,
                   help="reliability: memory left free for the OOM check (3 GiB was refused by the preflight)")
    p.add_argument("--parallel", type=int, default=1, help="sweep: configs trained at once on the one GPU")
    p.add_argument("--slowdown", type=float, default=1.7, help="sweep: estimate factor for a shared GPU")
    p.add_argument("--hard-s", type=float, default=570, help="sweep: stop running workers after this many seconds")
    p.add_argument("--workers-on-gpu", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--from-sweep", action="store_true", help="final: apply the sweep's chosen epochs, lr, rank")
    p.add_argument("--print-runs", action="store_true",
                   help="safety, qforms: print the run names (one worker each) and stop")
    p.add_argument("--table", action="store_true",
                   help="safety, ceiling, qforms: the table over the results there; train nothing")
    args = p.parse_args(argv)
    if args.print_runs:
        if args.what not in ("safety", "qforms"):
            p.error("--print-runs lists the runs of `safety` and `qforms` only")
        print(*(safety_runs() if args.what == "safety" else qforms_runs()))
        return 0
    args.profile_variants = [("as-committed", {}), ("no-step-logging", {"train.logging_steps": 100000})]
    result = {"setup": cmd_setup, "packing": cmd_packing, "sweep": cmd_sweep, "final": cmd_final,
              "reliability": cmd_reliability, "profile": cmd_profile, "ceiling": cmd_ceiling,
              "safety": cmd_safety, "qforms": cmd_qforms}[args.what](args)
    out = Path(os.environ.get("OUT", args.work))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.what}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
