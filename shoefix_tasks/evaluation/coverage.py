"""Does the training corpus teach what the holdout asks? Coverage of the holdout's key facts.

Why: the scorecard's key-data score asks the model for each holdout item's `key_facts`. A fact no
training answer states can only come from the base model's own knowledge, so a low key-data score
could mean "the corpus does not teach it" as much as "the model did not learn it". This module
separates the two: for every holdout item (both languages) and each key fact, is there a corpus answer
*of the same language* that states it?

- A numeric fact (one `numbers_with_units` can read: "24–48 hours", "60 °C", "250 mL"... ) is taught by
  an answer that states every one of its (number or range, unit) pairs: "60%" is not taught by "60 °C",
  and "24–48 hours" not by "24 hours".
- A named fact ("EVA", "isovaleric acid", "醋酸鈉") is taught by an answer that contains it after
  normalization (NFKC, case, dashes; whole words for Latin, so "EVA" is not found in "evaporate"), or
  that contains all of its content units (stems, CJK bigrams) somewhere.

`python -m shoefix_tasks.evaluation.coverage` prints the markdown table and summary; `--write-docs FILE` puts them
under the heading SECTION of that file, replacing only that section (others write the rest of it).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shoefix_tasks.config import Settings
from shoefix_tasks.records import iter_jsonl, load_eval_set
from shoefix_tasks.text import content_units, normalize, numbers_with_units

SECTION = "## Corpus coverage of holdout key facts"


@dataclass(frozen=True)
class FactRow:
    item: str  # holdout item id
    lang: str
    fact: str
    found: bool
    taught_by: str | None  # the first corpus record (file order) whose answer states it


@dataclass
class _Answer:
    id: str
    text: str  # normalized
    numbers: set[tuple[str, str]]
    units: set[str]

    @classmethod
    def of(cls, rec: dict) -> _Answer:
        return cls(rec["id"], normalize(rec["answer"]), numbers_with_units(rec["answer"]),
                   set(content_units(rec["answer"])))


def _phrase(fact: str) -> re.Pattern[str]:
    """The normalized fact as a pattern; Latin letters or digits at its ends must not continue into a
    longer word or number ("EVA" ≠ "evaporate", "2009" ≠ "20091")."""
    text = normalize(fact)
    head = r"(?<![a-z0-9])" if re.match(r"[a-z0-9]", text) else ""
    tail = r"(?![a-z0-9])" if re.search(r"[a-z0-9]$", text) else ""
    return re.compile(head + re.escape(text) + tail)


def states(fact: str, answer: _Answer) -> bool:
    """Whether the answer states the fact, by the rules above."""
    nums = numbers_with_units(fact)
    if nums:
        return nums <= answer.numbers
    if _phrase(fact).search(answer.text):
        return True
    units = set(content_units(fact))
    return bool(units) and units <= answer.units


def coverage(corpus: Iterable[dict], holdout: Iterable[dict]) -> list[FactRow]:
    """One row per (holdout item, key fact), in holdout order; corpus answers are searched in order."""
    answers: dict[str, list[_Answer]] = {}
    for rec in corpus:
        answers.setdefault(rec["lang"], []).append(_Answer.of(rec))
    rows = []
    for item in holdout:
        for fact in item["key_facts"]:
            by = next((a.id for a in answers.get(item["lang"], []) if states(fact, a)), None)
            rows.append(FactRow(item["id"], item["lang"], fact, by is not None, by))
    return rows


def load(data_dir: Path) -> tuple[list[dict], list[dict]]:
    corpus = list(iter_jsonl(sorted((data_dir / "corpus").glob("*.jsonl"))))
    return corpus, load_eval_set(data_dir, "holdout")


def summary(rows: list[FactRow]) -> dict[str, tuple[int, int]]:
    """{language or 'all': (facts taught, facts)}."""
    out: dict[str, tuple[int, int]] = {}
    for key in sorted({r.lang for r in rows}) + ["all"]:
        sel = [r for r in rows if key in ("all", r.lang)]
        out[key] = (sum(r.found for r in sel), len(sel))
    return out


def markdown(rows: list[FactRow]) -> str:
    """The summary, then one table row per holdout item: facts taught / total, the missing facts."""
    lines = ["| language | facts taught | facts | share |", "|---|---|---|---|"]
    for lang, (found, total) in summary(rows).items():
        lines.append(f"| {lang} | {found} | {total} | {found / total:.1%} |" if total else f"| {lang} | 0 | 0 | |")
    lines += ["", "| holdout item | taught / facts | missing facts |", "|---|---|---|"]
    items: dict[str, list[FactRow]] = {}
    for r in rows:
        items.setdefault(r.item, []).append(r)
    for item, facts in items.items():
        missing = ", ".join(f"`{r.fact}`" for r in facts if not r.found) or "—"
        lines.append(f"| {item} | {sum(r.found for r in facts)} / {len(facts)} | {missing} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace the text under SECTION (up to the next heading of the same or a higher level), or
    append the section when the file or heading is missing; the rest of the file is left as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{SECTION}\n\n{body.rstrip()}\n"
    head = re.search(rf"^{re.escape(SECTION)}[ \t]*$", text, re.M)
    if head is None:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block
    else:
        nxt = re.compile(r"^#{1,2} ", re.M).search(text, head.end())
        text = text[:head.start()] + block + ("\n" + text[nxt.start():] if nxt else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


DOC_INTRO = """Written by `python -m shoefix_tasks.evaluation.coverage --write-docs docs/quality.md`; the test
`tests/evaluation/test_coverage.py` asserts every fact is taught. A holdout key fact counts as *taught* when
some training answer of the same language states it: numeric facts with the same number or range and
unit (`text.numbers_with_units`), named facts as a normalized whole-word substring or with all their
content units. Taught does not mean learned: it only rules out the corpus as the reason a fact is
missing from a model's answer. Before the records of 2026-12-06 (data/CHANGES.md) the corpus taught 407
of the 416 facts (en 204/208, zh-TW 203/208): `75%`, `100 °C`, `REACH Annex XVII` (zh-TW), `sodium
acetate` / `醋酸鈉` were missing.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Coverage of the holdout's key facts by the training corpus.")
    ap.add_argument("--data", type=Path, help="default: the configured data folder (Settings.data_dir)")
    ap.add_argument("--write-docs", type=Path, help="also write the section into this markdown file")
    args = ap.parse_args(argv)
    rows = coverage(*load(args.data or Settings.from_env().data_dir))
    table = markdown(rows)
    print(table)
    if args.write_docs:
        write_section(args.write_docs, DOC_INTRO + "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
