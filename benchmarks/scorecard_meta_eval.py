"""The scorecard's meta-evaluation, before and after, side by side in one run.

"Before" is the scorecard as it landed before issue 11 (shoefix_tasks/evaluation/metrics.py at commit d25103e,
read from git and loaded as a module); "after" is the current one. Both score the same answers: every
holdout and guard reference, the hand-written paraphrases, the untrained base model's recorded answers
and the systematic degradations of shoefix_tasks.evaluation.degrade. Per kind: mean composite and the share of
items on which the reference (and the paraphrase) outranks the degraded answer.

    python benchmarks/scorecard_meta_eval.py            # prints the table (docs/scorecard.md)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BEFORE = "d25103e"


def old_scorer():
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:shoefix_tasks/metrics.py"], check=True,  # its path then
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "metrics_v1.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("metrics_v1", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["metrics_v1"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return lambda item, answer: mod.score_answer(item, answer).composite


def table(scorer_rows: dict, kinds: list[str]) -> None:
    print("| answer | n | before: mean | before: reference ranked above | before: paraphrase ranked above "
          "| after: mean | after: reference ranked above | after: paraphrase ranked above |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        cells = []
        for name in ("before", "after"):
            rows = [r for r in scorer_rows[name] if kind in r]
            para = [r for r in rows if "paraphrase" in r]
            mean = sum(r[kind] for r in rows) / len(rows)
            if kind in ("reference", "paraphrase", "base"):
                cells += [f"{mean:.2f}", "", ""]
                continue
            cells += [f"{mean:.2f}", f"{sum(r['reference'] > r[kind] for r in rows) / len(rows):.1%}",
                      f"{sum(r['paraphrase'] > r[kind] for r in para) / len(para):.1%}" if para else "n/a"]
        n = sum(1 for r in scorer_rows["after"] if kind in r)
        print(f"| {kind.replace('_', ' ')} | {n} | " + " | ".join(cells) + " |")


def main() -> int:
    from shoefix_tasks.evaluation.degrade import degradations
    from shoefix_tasks.evaluation.meta_eval import (
        KINDS,
        base_answers,
        eval_items,
        paraphrases,
        scorecard_report,
    )

    data = REPO / "data"
    items = eval_items(data)
    para, base = paraphrases(data), base_answers(data)
    v1 = old_scorer()
    before = []
    for i, it in enumerate(items):
        row = {"id": it["id"], "reference": v1(it, it["answer"])}
        if it["id"] in para:
            row["paraphrase"] = v1(it, para[it["id"]])
        if it["id"] in base:
            row["base"] = v1(it, base[it["id"]])
        row.update({k: v1(it, t) for k, t in degradations(items, i).items() if t is not None})
        before.append(row)
    after = scorecard_report(data)["rows"]
    print(f"Meta-evaluation: {len(items)} holdout + guard items (en + zh-TW), {len(para)} paraphrases, "
          f"{len(base)} recorded base-model answers; before = scorecard of {BEFORE}, after = this checkout.\n")
    table({"before": before, "after": after}, ["reference", "paraphrase", "base", *KINDS])
    on_base = [r for r in after if "base" in r]
    on_base_v1 = [r for r in before if "base" in r]
    print("\nOn the items the base model answered (English), mean composite:")
    for name, rows in (("before", on_base_v1), ("after", on_base)):
        means = {k: round(sum(r[k] for r in rows) / len(rows), 3) for k in ("base", "other_answer", "boilerplate", "question")}
        print(f"  {name}: {means}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
