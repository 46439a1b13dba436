"""Does one answer trained under several questions carry its facts to a question never trained on?"""

from __future__ import annotations

import json
import re
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
    split_corpus,
)

QFORMS_FILE = "question_forms.jsonl"  # under --data: more questions for each English corpus answer (data/CHANGES.md)
PHRASINGS_FILE = "answer_phrasings.jsonl"  # under --data: two more wordings of each English corpus answer
QFORMS_SEEDS = (42, 1, 2, 3)  # one device call; more through QFORMS_RUNS, as SAFETY_RUNS
# `plain`: the committed recipe (8 epochs). `forms`: every answer under its own question and its two question
# forms, 3 epochs: 9 passes over each answer against plain's 8, so a gain is not simply more training.
# `forms-nh`: `forms` without the forms that put a belief to the expert (HEARSAY), the control of the
# eleventh session (below). `para`: as `forms`, but each question form gets its own wording of the answer
# (PHRASINGS_FILE), the twelfth session's question (below).
QFORMS_EPOCHS = {"plain": 8, "forms": 3, "forms-nh": 3, "para": 3}
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
    "forbidden claims, guard + holdout answers (what the gate's floor reads)": lambda r: len(forbidden_all(r)),
}


# The pairs the table compares, each over the seeds run both ways: the first comparison; then, named in
# QFORMS_RUNS, three times the passes over each answer (24), the forms' epochs against plain's, to see whether
# the forms help once the model memorises its training answers, as the ceiling runs' 13 epochs did; then the
# wordings (`para`).
QFORMS_PAIRS = (("forms", "plain"), ("forms-e8", "plain-e24"), ("forms-nh-e8", "forms-e8"), ("forms-e8", "plain"),
                 ("para-e8", "forms-e8"), ("para-e8", "plain-e24"), ("para", "forms"), ("para", "plain"))
# Decided before the eleventh session's runs (docs/quality.md, "The lead put to the test"): on seeds 8-15,
# never run before, `forms-e8` against `plain-e24` is decided by the forbidden claims over the guard and
# holdout answers (what the gate's floor reads), paired by seed; the second pair asks whether the hearsay
# forms are what does it, the third compares with the committed recipe.
# Decided before the twelfth session's runs (docs/quality.md, "The facts in three wordings"): `para-e8` against
# `forms-e8` on the eight seeds both earlier sessions ran (42, 1, 2, 8-12), decided by validation key data,
# paired by seed: the same questions and passes, only the answers' wording differs; plain-e24 is reported.
# A form that puts someone's belief to the expert ("is it true that...", "my friend says..."), as the guard
# set's traps do: forms-nh leaves these out, to tell the number of questions from the way they ask.
HEARSAY = re.compile(r"\b(is it true|true that|says|said|told me|i heard|i've heard|i read|claims?|swears|"
                     r"insists|supposedly|myth|is that right|reckons|keeps saying|according to)\b", re.I)


def qforms_runs() -> list[str]:
    """The base, then `forms` and `plain` for each seed."""
    return ["base"] + [f"{v}-s{seed}" for seed in QFORMS_SEEDS for v in ("forms", "plain")]


def qforms_config(name: str) -> tuple[str, str, int, int]:
    """A run's name as (variant, kind, epochs, seed): `forms-s3` is forms at QFORMS_EPOCHS["forms"] with
    seed 3, `plain-e24-s1` plain at 24 epochs with seed 1."""
    variant, seed = name.rsplit("-s", 1)
    kind, _, epochs = variant.partition("-e")
    if kind not in QFORMS_EPOCHS:
        raise ValueError(f"unknown qforms run {name!r}: forms, forms-nh, para or plain, -e<epochs>, -s<seed>")
    return variant, kind, int(epochs) if epochs else QFORMS_EPOCHS[kind], int(seed)


def with_question_forms(rows: list[dict], forms_file: Path, *, hearsay: bool = True,
                        phrasings_file: Path | None = None) -> list[dict]:
    """Each row, then one row per question form of it: the same record (answer, facts, sources) under the
    other question, id `<id>-f<k>`. Forms of a record that is not in `rows` (a validation question) stay out;
    with hearsay=False, so do the forms HEARSAY matches. With a phrasings file, form k carries the answer's
    k-th other wording instead of the answer itself (facts and sources stay the record's), so each wording
    is trained under one question and every fact is met in three wordings."""
    from shoefix_tasks.records import iter_jsonl

    forms = {f["id"]: f["questions"] for f in iter_jsonl([forms_file])}
    worded = {p["id"]: p["answers"] for p in iter_jsonl([phrasings_file])} if phrasings_file else {}

    def answer(r: dict, k: int) -> str:
        return worded[r["id"]][k - 1] if phrasings_file else r["answer"]

    return rows + [{**r, "id": f"{r['id']}-f{k}", "question": q, "answer": answer(r, k)}
                   for r in rows for k, q in enumerate(forms.get(r["id"], ()), 1)
                   if hearsay or not HEARSAY.search(q)]


def cmd_qforms(args) -> dict[str, Any]:
    """Does the same answer under several questions carry its facts to a question never trained on? Each run
    in --only (default `qforms_runs`) trains the committed recipe on the sweep's training split, `plain` or
    with the question forms (`forms`, QFORMS_EPOCHS), then answers the validation split, the holdout and the
    guard set. Why: trained on one question per answer, the model gives back every fact of a question it saw
    and few of one it did not (`ceiling`); a model that sees a fact asked about in one way only may tie it to
    that wording. Results accumulate under --work/qforms; --table trains nothing."""
    from shoefix_tasks.config import Settings, load_recipe

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
            keep_row(out_file, base_row(args, {"epochs": 1, **cfg}, items), "done base")
            continue
        variant, kind, cfg["epochs"], seed = qforms_config(name)
        rows = (train_rows if kind == "plain"
                else with_question_forms(train_rows, data / QFORMS_FILE, hearsay=kind != "forms-nh",
                                         phrasings_file=data / PHRASINGS_FILE if kind == "para" else None))
        log(f"train {name}: {len(rows)} rows, {cfg['epochs']} epochs")
        row = {"variant": variant, **seeded_run(args, "qforms", name, cfg, rows, seed, items, settings)}
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
              f"{h['readability']:.2f} | {len(r['guard']['forbidden'])} / {len(forbidden_all(r))} |")
    paired = {f"{a} vs {b}": paired_by_seed(done, a, b, QFORMS_MEASURES) for a, b in QFORMS_PAIRS}
    return {"paired": paired, "runs": [{k: v for k, v in r.items() if k != "scores"} for r in order]}
