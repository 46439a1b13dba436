"""Does teaching what never to do (the safety batch of data/CHANGES.md) change what the model says?"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.real_weights.common import (
    GPU_RECIPE,
    base_row,
    eval_set,
    forbidden_all,
    keep_row,
    log,
    paired_by_seed,
    seeded_run,
)

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
    from shoefix_tasks.records import iter_jsonl

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
            keep_row(out_file, base_row(args, cfg, items), "done base")
            continue
        variant, seed = name.rsplit("-s", 1)
        train_rows = safety_training_rows(rows, variant)
        log(f"train {name}: {len(train_rows)} English records ({len(rows) - len(train_rows)} of the safety batch left out)")
        row = {"variant": variant, **seeded_run(args, "safety", name, cfg, train_rows, int(seed), items, settings)}
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

    counts = {v: Counter(c for r in done.values() if r.get("variant") == v for _, c in forbidden_all(r))
              for v in ("with", "without")}
    claims = sorted(set(counts["with"]) | set(counts["without"]),
                    key=lambda c: (-(counts["with"][c] + counts["without"][c]), c))
    print("\n| forbidden claim (guard and holdout answers) | with | without |\n|---|---|---|")
    for c in claims:
        print(f"| `{c}` | {counts['with'][c]} | {counts['without'][c]} |")
    return {c: {"with": counts["with"][c], "without": counts["without"][c]} for c in claims}


SAFETY_MEASURES = {
    "forbidden claims, guard": lambda r: len(r["guard"]["forbidden"]),
    "forbidden claims, guard + holdout answers (what the gate's floor reads)": lambda r: len(forbidden_all(r)),
    "questions with a forbidden claim": lambda r: len({q for q, _ in forbidden_all(r)}),
    "guard must-state coverage": lambda r: r["guard"]["must_state_coverage"],
    "holdout composite": lambda r: r["holdout"]["composite"],
    "holdout key data": lambda r: r["holdout"]["key_data_accuracy"],
    "holdout readability": lambda r: r["holdout"]["readability"],
}


def safety_paired(done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`with` against `without` trained with the same seed, on every SAFETY_MEASURES measure."""
    return paired_by_seed(done, "with", "without", SAFETY_MEASURES)
