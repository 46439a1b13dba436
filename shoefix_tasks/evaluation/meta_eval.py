"""Meta-evaluation: is the scorecard right? Is the safety floor right?

A score that decides promotions must rank answers we know are bad below answers we know are good.
For every holdout and guard item this scores the reference, hand-written faithful paraphrases
(`<data_dir>/meta_eval/paraphrases.jsonl`) and the systematic degradations of shoefix_tasks.evaluation.degrade,
and checks every item's safety claims on the reference (states its must_state claims, no forbidden
claim), on its paraphrase (no forbidden claim) and on its reversed advice (a forbidden claim).

  python -m shoefix_tasks.evaluation.meta_eval claims      # the safety-claim check, item by item
  python -m shoefix_tasks.evaluation.meta_eval scorecard   # the ranking table (docs/scorecard.md)
  python -m shoefix_tasks.evaluation.meta_eval record-base-answers   # the untrained base's answers (minutes)

The test suite runs the same functions (tests/evaluation/test_meta_eval.py); figures live in docs/.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from shoefix_tasks.evaluation.claims import Claim, load_claims, states
from shoefix_tasks.evaluation.degrade import reverse_advice
from shoefix_tasks.records import load_eval_set, read_jsonl

# A holdout item needs safety claims when it is about health or gives advice about a hazardous chemical.
CHEMICAL = re.compile(r"bleach|ammonia|chlorine|chloramine|ozone|dimethyl fumarate|isothiazolinone|biocide|"
                      r"fungicide|mothball|naphthalene|peroxide|disinfectant|pesticide|chemical", re.I)


def eval_items(data_dir: Path) -> list[dict[str, Any]]:
    """Holdout then guard items, both languages, in id order."""
    return load_eval_set(data_dir, "holdout") + load_eval_set(data_dir, "guard")


def needs_claims(item: dict[str, Any], english: dict[str, dict[str, Any]]) -> bool:
    """Guard items always; holdout items on health or chemicals (decided on the English version, so
    both languages of a question agree)."""
    en = english.get(item["qid"], item)
    return item["id"].startswith("guard-") or en["topic"] == "health" or bool(CHEMICAL.search(en["answer"]))


def paraphrases(data_dir: Path) -> dict[str, str]:
    path = data_dir / "meta_eval" / "paraphrases.jsonl"
    return {r["id"]: r["paraphrase"] for r in read_jsonl(path)} if path.is_file() else {}


def _forbidden_hits(text: str, lang: str, ids: list[str], claims: dict[str, Claim]) -> list[str]:
    return [cid for cid in ids if states(claims[cid], text, lang)]


def claim_report(data_dir: Path) -> dict[str, Any]:
    """Per item: problems with its claims. Returns {"items": [...], "problems": [...], "summary": {...}}."""
    claims = load_claims(data_dir)
    items = eval_items(data_dir)
    english = {it["qid"]: it for it in items if it["lang"] == "en"}
    para = paraphrases(data_dir)
    all_forbidden = sorted(c for c, v in claims.items() if v.kind == "must_not_state")
    rows, problems = [], []
    for it in items:
        must, must_not = list(it.get("must_state", ())), list(it.get("must_not_state", ()))
        required = needs_claims(it, english)
        row: dict[str, Any] = {"id": it["id"], "required": required, "must_state": must, "must_not_state": must_not}
        unknown = [c for c in must + must_not if c not in claims]
        wrong_kind = [c for c in must if c in claims and claims[c].kind != "must_state"] + \
                     [c for c in must_not if c in claims and claims[c].kind != "must_not_state"]
        if unknown or wrong_kind:
            problems.append(f"{it['id']}: unknown claims {unknown} / wrong kind {wrong_kind}")
            rows.append(row)
            continue
        if required and not (must and must_not):
            problems.append(f"{it['id']}: needs must_state and must_not_state claims")
        lang = it["lang"]
        row["ref_missed"] = [c for c in must if not states(claims[c], it["answer"], lang)]
        row["ref_forbidden"] = _forbidden_hits(it["answer"], lang, all_forbidden, claims)
        reversed_text = reverse_advice(it["answer"], lang)
        row["reversed_forbidden"] = _forbidden_hits(reversed_text, lang, must_not, claims)
        if it["id"] in para:
            row["paraphrase_forbidden"] = _forbidden_hits(para[it["id"]], lang, all_forbidden, claims)
            row["paraphrase_missed"] = [c for c in must if not states(claims[c], para[it["id"]], lang)]
            if row["paraphrase_forbidden"]:
                problems.append(f"{it['id']}: paraphrase states forbidden {row['paraphrase_forbidden']}")
        if row["ref_missed"]:
            problems.append(f"{it['id']}: reference does not state its must_state {row['ref_missed']}")
        if row["ref_forbidden"]:
            problems.append(f"{it['id']}: reference states forbidden {row['ref_forbidden']}")
        if must_not and not row["reversed_forbidden"] and it["id"].startswith("guard-"):
            # the target is every guard item; on holdout items reversing the wording does not always
            # produce dangerous advice (the rate is reported)
            problems.append(f"{it['id']}: reversed advice states none of its must_not_state claims")
        rows.append(row)
    guard = [r for r in rows if r["id"].startswith("guard-")]
    summary = {
        "items": len(rows), "items_with_claims": sum(1 for r in rows if r["must_state"] or r["must_not_state"]),
        "claims": len(claims), "forbidden_claims": len(all_forbidden),
        "guard_items": len(guard),
        "guard_reversed_caught": sum(1 for r in guard if r.get("reversed_forbidden")),
        "holdout_with_claims": sum(1 for r in rows if r["must_not_state"] and not r["id"].startswith("guard-")),
        "holdout_reversed_caught": sum(1 for r in rows if r.get("reversed_forbidden")
                                       and not r["id"].startswith("guard-")),
        "problems": len(problems),
    }
    return {"items": rows, "problems": problems, "summary": summary}


KINDS = ("wrong_numbers", "reversed", "other_answer", "boilerplate", "question", "half", "empty")
OFF_TOPIC = ("other_answer", "boilerplate", "question")  # must score below the untrained base model


def base_answers(data_dir: Path) -> dict[str, str]:
    """The untrained base model's answers (`<data_dir>/meta_eval/base_answers.jsonl`), if recorded."""
    path = data_dir / "meta_eval" / "base_answers.jsonl"
    return {r["id"]: r["answer"] for r in read_jsonl(path)} if path.is_file() else {}


def scorecard_report(data_dir: Path) -> dict[str, Any]:
    """Score the reference, its paraphrase and every degradation of every item; rank them."""
    from shoefix_tasks.evaluation.degrade import degradations
    from shoefix_tasks.evaluation.metrics import Context, fixed_answers, score_answer

    ctx = Context.from_data(data_dir)
    items = eval_items(data_dir)
    para, base = paraphrases(data_dir), base_answers(data_dir)
    # each kind of answer is scored as one model's set of answers (a fixed answer is caught across them)
    answers = {"reference": {it["id"]: it["answer"] for it in items}, "paraphrase": para, "base": base}
    for i, it in enumerate(items):
        for kind, text in degradations(items, i).items():
            if text is not None:
                answers.setdefault(kind, {})[it["id"]] = text
    rows = {it["id"]: {"id": it["id"], "lang": it["lang"]} for it in items}
    for kind, by_id in answers.items():
        scored = [it for it in items if it["id"] in by_id]
        fixed = fixed_answers(scored, [by_id[it["id"]] for it in scored])
        for i, it in enumerate(scored):
            rows[it["id"]][kind] = score_answer(it, by_id[it["id"]], ctx, fixed=i in fixed).composite
    rows = list(rows.values())
    table = {}
    for kind in KINDS:
        have = [r for r in rows if kind in r]
        with_para = [r for r in have if "paraphrase" in r]
        table[kind] = {
            "n": len(have),
            "mean": round(sum(r[kind] for r in have) / len(have), 3) if have else None,
            "ref_wins": round(sum(r["reference"] > r[kind] for r in have) / len(have), 4) if have else None,
            "para_wins": (round(sum(r["paraphrase"] > r[kind] for r in with_para) / len(with_para), 4)
                          if with_para else None),
        }
    with_para = [r for r in rows if "paraphrase" in r]
    based = [r for r in rows if "base" in r]
    summary = {
        "reference_mean": round(sum(r["reference"] for r in rows) / len(rows), 3),
        "paraphrase_mean": round(sum(r["paraphrase"] for r in with_para) / len(with_para), 3) if with_para else None,
        "paraphrase_gap_mean": (round(sum(r["reference"] - r["paraphrase"] for r in with_para) / len(with_para), 3)
                                if with_para else None),
        "paraphrase_gap_max": round(max((r["reference"] - r["paraphrase"] for r in with_para), default=0.0), 3),
        "base_mean": round(sum(r["base"] for r in based) / len(based), 3) if based else None,
        "base_items": len(based),
        "off_topic_means_on_base_items": {k: round(sum(r[k] for r in based) / len(based), 3)
                                          for k in OFF_TOPIC} if based else {},
    }
    return {"rows": rows, "table": table, "summary": summary}


def print_table(data_dir: Path) -> int:
    report = scorecard_report(data_dir)
    print("| answer | n | mean composite | reference ranked above | paraphrase ranked above |")
    print("|---|---|---|---|---|")
    s = report["summary"]
    print(f"| reference | {len(report['rows'])} | {s['reference_mean']:.2f} | | |")
    if s["paraphrase_mean"] is not None:
        print(f"| paraphrase (hand-written) | {sum('paraphrase' in r for r in report['rows'])} | "
              f"{s['paraphrase_mean']:.2f} (gap to reference: mean {s['paraphrase_gap_mean']:.2f}, "
              f"max {s['paraphrase_gap_max']:.2f}) | | |")
    if s["base_mean"] is not None:
        print(f"| untrained base model | {s['base_items']} | {s['base_mean']:.2f} | | |")
    for kind, t in report["table"].items():
        para = f"{t['para_wins']:.1%}" if t["para_wins"] is not None else "n/a"
        print(f"| {kind.replace('_', ' ')} | {t['n']} | {t['mean']:.2f} | {t['ref_wins']:.1%} | {para} |")
    if s["off_topic_means_on_base_items"]:
        print("\non the items the base model answered: base", s["base_mean"], "vs",
              json.dumps(s["off_topic_means_on_base_items"]))
    return 0


def record_base_answers(data_dir: Path, recipe_name: str = "default") -> Path:
    """Answer every holdout and guard item of the recipe's languages with the untrained base model, as
    evaluation does (same prompt, greedy decoding, enough new tokens for the longest reference), and
    keep the answers in `<data_dir>/meta_eval/base_answers.jsonl`. The base is frozen and decoding
    greedy, so these are what every evaluation's "base" champion answers; recording them once keeps
    the test suite from loading a model."""
    import datetime

    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.model.generation import generate, load_answerer, tokens_needed
    from shoefix_tasks.policy import load_policy
    from shoefix_tasks.records import write_jsonl

    recipe, settings = load_recipe(recipe_name), Settings.from_env()
    items = [it for it in eval_items(data_dir) if it["lang"] in recipe.eval.languages]
    ans = load_answerer(recipe.model.base_model, None, settings, recipe.model.dtype, label="base")
    max_new = max(recipe.eval.max_new_tokens,
                  tokens_needed(ans, [it["answer"] for it in items], load_policy().evaluation.token_margin))
    gens = generate(ans, [it["question"] for it in items], max_new, recipe.eval.batch_size, recipe.eval.repetition_penalty)
    meta = {"model": recipe.model.base_model, "recipe": recipe_name, "max_new_tokens": max_new,
            "repetition_penalty": recipe.eval.repetition_penalty, "recorded": datetime.date.today().isoformat()}
    return write_jsonl(data_dir / "meta_eval" / "base_answers.jsonl",
                       ({"id": it["id"], "answer": g["answer"], **meta} for it, g in zip(items, gens, strict=True)))


def main(argv: list[str] | None = None) -> int:
    from shoefix_tasks.config import REPO_ROOT

    p = argparse.ArgumentParser(prog="python -m shoefix_tasks.evaluation.meta_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["claims", "scorecard", "record-base-answers"])
    p.add_argument("--data", type=Path, default=REPO_ROOT / "data")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = p.parse_args(argv)
    if args.what == "claims":
        report = claim_report(args.data)
        if args.json:
            print(json.dumps(report, indent=1, ensure_ascii=False))
        for line in report["problems"]:
            print("PROBLEM", line)
        print(json.dumps(report["summary"]))
        return 1 if report["problems"] else 0
    if args.what == "record-base-answers":
        print(record_base_answers(args.data))
        return 0
    return print_table(args.data)


if __name__ == "__main__":
    sys.exit(main())
