"""Which recipe makes the best expert: the sweep (chosen on a validation split), the ceiling runs (seen
against unseen questions), and the chosen recipe end to end in a fresh process (`final`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.real_weights.common import (
    EXTRA,
    GPU_RECIPE,
    REPO,
    answer,
    eval_set,
    finish,
    grid,
    keep_row,
    log,
    loss_curve,
    recipe_for,
    run_metric,
    score,
    seeded_run,
    split_corpus,
    summarize,
    trainer_cli,
)


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

    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.records import iter_jsonl

    work, data = Path(args.work), Path(args.data)
    rows = [r for r in iter_jsonl(sorted((data / "corpus").glob("*.jsonl"))) if r["lang"] == "en"]
    items, settings = eval_set(data), Settings.from_env()
    seed = load_recipe(GPU_RECIPE).train.seed  # the recipe's own, as the sweep trains
    for name in [] if args.table else args.only or CEILING:
        out_file = work / "ceiling" / f"{name}.json"
        if out_file.is_file():
            continue
        cfg = {k: v for k, v in next(c for c in grid() if c["name"] == name).items() if k != "name"}
        log(f"train {name} on all {len(rows)} English records")
        row = seeded_run(args, "ceiling", name, cfg, rows, seed, items, settings)
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
    child_args = [sys.executable, str(REPO / "benchmarks" / "gpu_real_weights.py"), "sweep", "--parallel", "1", "--budget-s", "1e9",
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
        code, out = finish(trainer_cli(name, snapshot, work / "final" / name, f"final-{name}",
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
