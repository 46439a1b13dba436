"""Question paraphrases of the frozen holdout/guard items: rarity-weighted term Jaccard.

Why a second near-duplicate measure: the character-5-gram MinHash check (`screening.NearDupIndex`,
Jaccard >= 0.7) catches copies and light edits, not the same question in other words. Issue 12
found three training questions that ask a holdout question again (foam clogs in the dishwasher or
boiling water; soccer cleats left in a sports bag) with only 7-25% of their 5-grams shared, and
they went into training. What such paraphrases share is the *specific* vocabulary of the question
and its phrases ("foam clog", "dishwasher", "boil"; "soccer cleat", "sport bag", "son"), while
unrelated questions of this domain share its common words (shoe, mold, leather, smell).

So a question becomes a set of terms: its content units (`text.content_units`: word stems without
stop words, CJK character bigrams) plus each pair of adjacent units (phrases, word order). Each term
weighs its smoothed IDF over the frozen questions and answers of its language, log((N+1)/(df+1))+1:
a term the frozen texts never use weighs most, "shoe" least. The score of a question against a frozen
question is the weighted Jaccard of their term sets. IDF comes from the frozen sets only, so the
weights are as fixed as the sets themselves (FROZEN.sha256) and need no corpus at intake.

PARAPHRASE_THRESHOLD sits just under the lowest-scoring confirmed paraphrase of the measured
distribution (`python -m shoefix_tasks.intake.leak` prints it; the figures and the records behind
the choice are in docs/quality.md): whatever is at least as close to a frozen question as a known
leak is treated as one. No lexical measure tried separated the confirmed paraphrases from the rest by
a gap, so the threshold trades a few false alarms for no leaks: a quarantined record costs an expert a
rewrite (it stays in the ledger with the frozen id in its reason); a leak silently inflates the
holdout score. `tests/intake/test_leak_check.py` keeps the shipped corpus below the threshold.

Cost: a question's terms (one `content_units` pass) and, per language, one gather-and-sum of its
terms' rows of a (vocabulary x items) weight matrix: no Python loop over the frozen items.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from shoefix_tasks.text import content_units, is_cjk, stem

PARAPHRASE_THRESHOLD = 0.16
# British spellings the domain uses, folded after stemming so "anti-mould" meets "anti-mold" (a unit
# lookup, cheaper than a regex over every question).
_FOLD = {stem(b): stem(a) for b, a in (("mould", "mold"), ("moulds", "molds"), ("mouldy", "moldy"),
                                        ("odour", "odor"), ("odours", "odors"), ("colour", "color"),
                                        ("fibre", "fiber"), ("centre", "center"))}


def language_of(text: str) -> str:
    """'zh-TW' for a mostly-CJK question, else 'en': by script, not by the record's label, so a
    mislabelled record is still compared with the items of its real language."""
    return "zh-TW" if is_cjk(text) else "en"


def terms(text: str) -> set[str]:
    """Content units and adjacent unit pairs (pairs marked with a space, which no unit contains)."""
    units = [_FOLD.get(u, u) for u in content_units(text)]
    return set(units) | {f"{a} {b}" for a, b in zip(units, units[1:], strict=False)}


@dataclass
class _Group:
    """The frozen items of one language: ids, term vocabulary, IDF, and the weight matrix."""

    keys: list[str]
    vocab: dict[str, int]  # the terms of the frozen questions: the rows of `rows`
    idf: dict[str, float]  # every term of the frozen questions and answers
    unseen: float  # IDF of a term no frozen text of this language uses
    rows: np.ndarray  # vocabulary x items: the term's IDF where the item's question has it
    sizes: np.ndarray  # each item's total question weight


def _group(items: list[tuple[str, str, str]]) -> _Group:
    """items: (key, question, answer) of one language."""
    q_terms = [terms(q) for _, q, _ in items]
    df = Counter(t for ts, (_, _, a) in zip(q_terms, items, strict=True) for t in ts | terms(a))
    n = len(items)
    vocab = {t: i for i, t in enumerate(sorted(set().union(*q_terms)))}
    idf = {t: math.log((n + 1) / (c + 1)) + 1 for t, c in df.items()}
    rows = np.zeros((len(vocab), n))  # one contiguous row per term: a query gathers its terms' rows
    for item, ts in enumerate(q_terms):
        rows[[vocab[t] for t in ts], item] = [idf[t] for t in ts]
    return _Group([k for k, _, _ in items], vocab, idf, math.log(n + 1) + 1, rows, rows.sum(axis=0))


class ParaphraseIndex:
    """The frozen questions, per language; `query` answers the closest one at or above the threshold."""

    def __init__(self, rows: Iterable[dict], threshold: float = PARAPHRASE_THRESHOLD) -> None:
        by_lang: dict[str, list[tuple[str, str, str]]] = {}
        for r in rows:
            q = r["question"]
            by_lang.setdefault(language_of(q), []).append((r["id"], q, r.get("answer", "")))
        self.groups = {lang: _group(items) for lang, items in by_lang.items()}
        self.threshold = threshold

    def _overlap(self, question: str) -> tuple[_Group, np.ndarray, float] | None:
        """(group, shared term weight with each frozen question, the question's own term weight)."""
        g = self.groups.get(language_of(question))
        if g is None:
            return None
        ts = terms(question)
        cols = [g.vocab[t] for t in ts if t in g.vocab]
        return g, g.rows[cols].sum(axis=0), sum(g.idf.get(t, g.unseen) for t in ts)

    def scores(self, question: str) -> tuple[list[str], np.ndarray]:
        """Weighted Jaccard of the question against every frozen question of its language."""
        found = self._overlap(question)
        if found is None:
            return [], np.empty(0)
        g, inter, own = found
        union = own + g.sizes - inter
        return g.keys, np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

    def containment(self, question: str) -> tuple[list[str], np.ndarray]:
        """Share of the question's term weight that each frozen question also has: a short question
        inside a long one scores high here and low in `scores` (whose union counts the long one's terms)."""
        found = self._overlap(question)
        if found is None:
            return [], np.empty(0)
        g, inter, own = found
        return g.keys, inter / own if own else np.zeros(len(g.keys))

    def closest(self, question: str) -> tuple[str | None, float]:
        keys, s = self.scores(question)
        if not keys:
            return None, 0.0
        i = int(np.argmax(s))
        return keys[i], float(s[i])

    def query(self, question: str) -> tuple[str, float] | None:
        """(frozen id, score) when the question paraphrases a frozen one, else None."""
        key, score = self.closest(question)
        return (key, score) if key is not None and score >= self.threshold else None


def distribution(corpus: list[dict], frozen: list[dict]) -> list[tuple[float, str, str]]:
    """Each corpus record's closest frozen question: (score, record id, frozen id), highest first."""
    index = ParaphraseIndex(frozen)
    rows = []
    for r in corpus:
        key, score = index.closest(r["question"])
        rows.append((score, r["id"], key or ""))
    return sorted(rows, reverse=True)


def main(argv: list[str] | None = None) -> int:
    """Print the measured distribution: percentiles, and the records closest to a frozen question."""
    import argparse
    from pathlib import Path

    from shoefix_tasks.config import Settings
    from shoefix_tasks.records import iter_jsonl, load_eval_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="default: the configured data folder (Settings.data_dir)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    args.data = args.data or Settings.from_env().data_dir
    corpus = list(iter_jsonl(sorted((args.data / "corpus").glob("*.jsonl"))))
    frozen = load_eval_set(args.data, "holdout") + load_eval_set(args.data, "guard")
    rows = distribution(corpus, frozen)
    s = np.array([x[0] for x in rows])
    print(f"{len(rows)} records against {len(frozen)} frozen items; threshold {PARAPHRASE_THRESHOLD}")
    print("percentiles 50/90/95/99/max: " + " / ".join(f"{np.percentile(s, p):.3f}" for p in (50, 90, 95, 99, 100)))
    flagged = [x for x in rows if x[0] >= PARAPHRASE_THRESHOLD]
    print(f"flagged: {len(flagged)}")
    for score, rid, key in rows[: max(args.top, len(flagged))]:
        print(f"{score:.3f}  {rid:14s} {key:20s} {'FLAGGED' if score >= PARAPHRASE_THRESHOLD else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
