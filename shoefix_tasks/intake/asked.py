"""What people ask that the corpus does not answer: served questions with no close corpus question.

Closeness uses the holdout-leak check's terms and weights (`intake.leak.ParaphraseIndex`: word stems and
adjacent pairs, weighted by rarity, per language), built here over the corpus, but as *containment*:
the share of the asked question's term weight that a corpus question also has. Jaccard (the leak
check's score) punishes a short question against a long corpus question for the long one's extra words,
and served questions are short ("Does baking soda remove shoe odor?" against a four-line corpus
question). A question is *covered* at COVERED_AT or above. The value was read off a handful of
questions (docs/quality.md, "Coverage of asked questions"): plainly covered ones scored 0.34-0.80,
off-domain ones 0.00-0.26; one covered question ("leather boots moldy in a humid closet", 0.28) falls
under it, so the list errs towards showing a question an expert may judge covered. Uncovered questions
are listed under the topic of their nearest corpus question (a guess the expert can change). The same question asked again (same normalized text)
counts once more, so the list leads with what is asked most.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from shoefix_tasks.config import Settings
from shoefix_tasks.intake.leak import ParaphraseIndex
from shoefix_tasks.records import iter_jsonl, normalize_text

COVERED_AT = 0.3


def uncovered(questions: Iterable[str], corpus: list[dict[str, Any]], threshold: float = COVERED_AT,
              top: int = 50) -> list[dict[str, Any]]:
    """The most-asked questions without a close corpus question: question, times asked, nearest corpus
    question id and its score, and that question's topic; most asked first."""
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for q in questions:
        key = normalize_text(q)
        if key:
            counts[key] += 1
            first.setdefault(key, q)
    if not counts:
        return []
    index = ParaphraseIndex(corpus) if corpus else None
    topics = {r["id"]: r.get("topic", "") for r in corpus}
    out = []
    for key, n in counts.most_common():
        keys, share = index.containment(first[key]) if index else ([], np.empty(0))
        best = int(np.argmax(share)) if len(keys) else -1
        nearest, score = (keys[best], float(share[best])) if best >= 0 and share[best] > 0 else (None, 0.0)
        if score < threshold:
            out.append({"question": first[key], "asked": n, "nearest_id": nearest, "score": round(score, 3),
                        "topic": topics.get(nearest or "", "unknown")})
        if len(out) >= top:
            break
    return out


def by_topic(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["topic"], []).append(row)
    return dict(sorted(out.items(), key=lambda kv: -sum(r["asked"] for r in kv[1])))


def taught_corpus(settings: Settings) -> list[dict[str, Any]]:
    """What the champion was taught: the shipped corpus and the newest validated snapshot, by record id."""
    snapshots = sorted((settings.home / "snapshots").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    files = [*sorted((settings.data_dir / "corpus").glob("*.jsonl")), *snapshots[-1:]]
    return list({r["id"]: r for r in iter_jsonl(files)}.values())
