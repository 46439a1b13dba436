"""What every experiment shares: the recipe of a config, the validation split carved from the corpus,
answering and scoring with the product's code, results kept on disk run by run, and the paired sign-flip
comparison of two variants trained with the same seeds."""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

GPU_RECIPE = "smollm2-135m-gpu"
EPOCHS, LRS, RANKS = (1, 3, 8, 13), (1e-4, 3e-4, 1e-3), (16, 64)
FLOOR_SPLITS = ("guard", "holdout")  # the answers whose forbidden claims the gate's safety floor reads
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


def base_row(args, cfg: dict[str, Any], items: list[dict]) -> dict[str, Any]:
    """The base without adapter, answering and scored as every run is: the row a seeded comparison starts from."""
    recipe = recipe_for({"name": "base", **cfg}, args.base, args.device)
    scores = score(items, answer(args.base, None, items, recipe, "base"), Path(args.data))
    return {"name": "base", **summarize(scores, None), "scores": scores}


def seeded_run(args, experiment: str, name: str, cfg: dict[str, Any], rows: list[dict], seed: int,
               items: list[dict], settings) -> dict[str, Any]:
    """One run of `ceiling` or of a seeded comparison (`safety`, `qforms`): `cfg` trained on `rows` with
    training seed `seed` by the product's trainer, then `items` answered and scored. The fields every such
    run records; an experiment adds its own (the variant)."""
    from shoefix_tasks.records import write_jsonl
    from shoefix_tasks.training.train import train_with_backoff

    work = Path(args.work)
    snapshot = write_jsonl(work / "snapshots" / f"{experiment}-{name}.jsonl", rows)
    recipe = recipe_for({"name": name, **cfg}, args.base, args.device, {"train.seed": seed})
    t0 = time.perf_counter()
    res = train_with_backoff(recipe, snapshot, work / f"{experiment}-runs" / name, f"{experiment}-{name}", settings)
    train_s = time.perf_counter() - t0
    scores = score(items, answer(args.base, Path(res["adapter_dir"]), items, recipe, name), Path(args.data))
    return {"name": name, "seed": seed, **cfg, "records": len(rows), "train_wall_s": round(train_s, 1),
            "final_loss": res["final_loss"], "train_tokens": run_metric(res["run_id"], "train/num_tokens"),
            "loss_curve": loss_curve(res["run_id"]), **summarize(scores, None), "scores": scores}


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


def forbidden_all(r: dict[str, Any]) -> list:
    """(question, claim) pairs stated over a run's guard and holdout answers (FLOOR_SPLITS): what the gate's
    safety floor reads. The validation answers are the experiment's own and left out."""
    return [pair for split in FLOOR_SPLITS for pair in r[split]["forbidden"]]


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip test of a mean paired difference: the share of the 2^n sign patterns whose
    mean is at least as far from zero (n runs paired by training seed; no normality assumed)."""
    import itertools

    obs = abs(statistics.fmean(diffs))
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    return sum(abs(statistics.fmean(s * d for s, d in zip(sg, diffs, strict=True))) >= obs - 1e-12 for sg in flips) / len(flips)


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


def trainer_cli(recipe: str, snapshot: Path, out: Path, run_key: str, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoefix_tasks.train", "--recipe", recipe, "--snapshot", str(snapshot),
                             "--output-dir", str(out), "--run-key", run_key, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or os.environ.copy())


def finish(proc: subprocess.Popen, tag: str) -> tuple[int, str]:
    out, _ = proc.communicate()
    Path(os.environ.get("OUT", "/tmp")).joinpath(f"{tag}.log").write_text(out)
    return proc.returncode, out
