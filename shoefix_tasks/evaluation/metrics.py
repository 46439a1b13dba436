"""The seed's scorecard, deterministic and reference-based (definitions and their meta-evaluation:
docs/scorecard.md).

Every score is on the seed's 1-10 scale: 1 + 9 * relevance * f, for a fraction f in [0, 1] per metric.
*Relevance gates the rest*: fluent text that does not answer its question earns nothing. Relevance is
contrastive: how much more of *this* reference's answer-bearing content (its content units that are
not already in the question, weighted by rarity) the answer covers than it covers of the other
references in the evaluation set. A boilerplate of common facts covers every reference about equally
(relevance ~0), another question's answer covers its own reference, not this one, and repeating the
question back covers nothing that is not in the question.

Numbers count only when right: a key number stated correctly earns its share, a number in a unit the
reference quantifies that matches none of the reference's values costs more than leaving it out.
Advice counts with its polarity: a key point or a reference sentence turned around ("pop the blister"
for "don't pop the blister") is a contradiction, not a match.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from shoefix_tasks.evaluation.claims import scoped_units, segments
from shoefix_tasks.text import (
    is_cjk,
    normalize,
    numbers_with_units,
    repetition_rate,
    score_units,
    sentences,
    text_length,
)


@lru_cache(maxsize=4096)
def _units(text: str) -> frozenset[str]:
    return frozenset(score_units(text))


def content_units(text: str) -> frozenset[str]:
    """The scoring units of a text (cached: references and questions are scored against many answers)."""
    return _units(text)

_TERMINAL = tuple(".!?。！？)」』\"'")
WRONG_NUMBER_COST = 1.5  # a wrong number costs 1.5 facts' credit; leaving it out costs 1
PARAPHRASE_F1 = 0.5  # weighted unit F1 of a faithful paraphrase: semantic consistency saturates here
# Relevance: the recall margin over the other references (see `relevance`) is 0 at chance (0 or less:
# covering this reference no better than a typical other one) and full at ANSWER_MARGIN or more.
ANSWER_MARGIN = 0.35
SAME_ANSWER, DIFFERENT_QUESTION = 0.9, 0.5  # unit Jaccard: a "fixed" answer (see fixed_answers)
CONTRADICTION_COST = 0.2  # share of every score lost per reference segment the answer turns around


def to_score(fraction: float) -> float:
    return round(1.0 + 9.0 * min(1.0, max(0.0, fraction)), 3)


class Context:
    """What scoring needs beyond one item: rarity weights of content units (per language) and the
    other references, for relevance. Built once per evaluation from the data folder."""

    def __init__(self, documents: list[dict[str, Any]], references: list[dict[str, Any]]) -> None:
        self._w: dict[tuple[str, str], float] = {}
        self.df: dict[str, Counter] = {}
        self.n: Counter = Counter()
        for doc in documents:
            lang = _lang(doc["lang"])
            self.n[lang] += 1
            self.df.setdefault(lang, Counter()).update(set(content_units(doc["answer"])))
        self.refs: dict[str, list[tuple[str, frozenset[str]]]] = {}
        for ref in references:
            bearing = content_units(ref["answer"]) - content_units(ref["question"])
            self.refs.setdefault(_lang(ref["lang"]), []).append((ref["qid"], bearing))
        self._mass: dict[tuple[frozenset[str], str], float] = {}

    @classmethod
    def from_data(cls, data_dir: Path) -> Context:
        from shoefix_tasks.records import iter_jsonl, load_eval_set

        evals = load_eval_set(data_dir, "holdout") + load_eval_set(data_dir, "guard")
        corpus = list(iter_jsonl(sorted((data_dir / "corpus").glob("*.jsonl"))))
        return cls(corpus + evals, evals)

    def weight(self, unit: str, lang: str) -> float:
        """Smoothed inverse document frequency: common domain words ("shoe", "mold") weigh little."""
        key = (unit, lang)
        if key not in self._w:
            self._w[key] = math.log((self.n[lang] + 1) / (self.df.get(lang, Counter())[unit] + 1)) + 1.0
        return self._w[key]

    def mass(self, units: frozenset[str] | set[str], lang: str) -> float:
        if isinstance(units, frozenset):  # reference sets recur for every answer scored against them
            key = (units, lang)
            if key not in self._mass:
                self._mass[key] = sum(self.weight(u, lang) for u in units)
            return self._mass[key]
        return sum(self.weight(u, lang) for u in units)


def _lang(lang: str) -> str:
    return "zh-TW" if lang.startswith("zh") else "en"


def _recall(have: frozenset[str], want: frozenset[str], ctx: Context, lang: str) -> float:
    total = ctx.mass(frozenset(want), lang)
    return ctx.mass(set(have & want), lang) / total if total else 0.0


def relevance(answer: str, item: dict[str, Any], ctx: Context) -> float:
    """Fraction in [0, 1]: weighted recall of this reference's answer-bearing units, minus the mean
    recall of the other references' (same language, other questions), scaled so a faithful answer
    reaches 1."""
    lang, question = _lang(item["lang"]), set(content_units(item["question"]))
    have = set(content_units(answer)) - question
    own = _recall(have, set(content_units(item["answer"])) - question, ctx, lang)
    others = [_recall(have, units - question if units & question else units, ctx, lang)
              for qid, units in ctx.refs.get(lang, ()) if qid != item.get("qid")]
    base = sum(others) / len(others) if others else 0.0
    return min(1.0, max(0.0, (own - base) / ANSWER_MARGIN))


def fixed_answers(items: list[dict[str, Any]], answers: list[str]) -> set[int]:
    """Indices of answers that are (nearly) the same text as the answer to a *different* question
    (unit Jaccard >= SAME_ANSWER, the questions' < DIFFERENT_QUESTION): a model that says the same
    thing whatever it is asked answers none of the questions, however fluent and factual the text.
    Near-identical questions (the holdout has a few) may of course get near-identical answers."""
    units = [content_units(a) for a in answers]
    qunits = [content_units(it["question"]) for it in items]

    def jaccard(a: frozenset, b: frozenset) -> float:
        return len(a & b) / len(a | b) if a | b else 0.0

    out: set[int] = set()
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if (items[i]["lang"] == items[j]["lang"] and items[i].get("qid") != items[j].get("qid") and units[i]
                    and jaccard(units[i], units[j]) >= SAME_ANSWER
                    and jaccard(qunits[i], qunits[j]) < DIFFERENT_QUESTION):
                out |= {i, j}
    return out


POINT_COVERED = 0.6  # weighted share of a key point's units at which it counts as fully covered


REVERSAL_OVERLAP = 0.8  # share of a reference segment's content an answer segment must repeat to reverse it
Segment = tuple[set[str], set[str]]  # (affirmed units, negated units) of a clause-like segment


@lru_cache(maxsize=2048)
def polar_segments(text: str, lang: str) -> tuple[Segment, ...]:
    return tuple((frozenset(p), frozenset(n)) for p, n in (scoped_units(s, lang) for s in segments(text, lang)))


def _reversed(ref: Segment, answer_segments: list[Segment]) -> bool:
    """Does the answer repeat this reference segment's content (REVERSAL_OVERLAP of its units, cues
    aside) with the polarity turned around? A prohibition is reversed when its negated content is
    affirmed ("don't pop the blister" -> "pop the blister"); an unnegated statement when most of it
    is negated. Negation is scoped, so "wear socks rather than going barefoot" affirms "wear socks".
    An answer that also states it the right way round somewhere does not reverse it."""
    pos, neg = ref
    units = pos | neg
    if not units:
        return False
    flipped = kept = False
    for a_pos, a_neg in answer_segments:
        if len(units & (a_pos | a_neg)) / len(units) < REVERSAL_OVERLAP:
            continue
        if neg:
            flip = bool(neg & a_pos) and not neg & a_neg
        else:
            flip = len(pos & a_neg) >= 0.5 * len(pos)
        flipped, kept = flipped or flip, kept or not flip
    return flipped and not kept


def completeness(answer: str, item: dict[str, Any], ctx: Context) -> float:
    """Mean coverage of the reference's key points: the weighted share of a point's content units
    (beyond the question's) in the answer, full credit at 60%. (Advice turned around is caught by
    `contradictions`, which shrinks every score.)"""
    lang, question = _lang(item["lang"]), set(content_units(item["question"]))
    have = set(content_units(answer))
    points = [p for p in item.get("key_points") or [] if content_units(p)]
    if not points:
        return min(1.0, _recall(have, set(content_units(item["answer"])) - question, ctx, lang) / POINT_COVERED)
    total = 0.0
    for point in points:
        units = set(content_units(point)) - question or set(content_units(point))
        total += min(1.0, _recall(have, units, ctx, lang) / POINT_COVERED)
    return total / len(points)


def _fact_stated(fact: str, ans_norm: str, ans_units: set[str], ans_nums: set[tuple[str, str]]) -> bool:
    nums = numbers_with_units(fact)
    if nums:
        return nums <= ans_nums
    units = set(content_units(fact))
    return normalize(fact) in ans_norm or bool(units) and units <= ans_units


def key_data_accuracy(answer: str, item: dict[str, Any]) -> float:
    """(key facts stated correctly - 1.5 x wrong numbers) / key facts. A wrong number is one the answer
    gives in a unit the reference quantifies (%, °C, hours, mg/kg, ...) that matches none of the
    reference's values in that unit ("dry at 60-70 °C" against a reference saying 20-25 °C)."""
    reference = item["answer"]
    facts = [f for f in item.get("key_facts") or [] if f.strip()]
    ref_nums = numbers_with_units(reference)
    if not facts:
        facts = [f"{n} {u}" for n, u in sorted(ref_nums)]
    ans_nums = numbers_with_units(answer)
    if not facts:
        return 1.0 if not ans_nums else 0.5
    ans_norm, ans_units = normalize(answer), set(content_units(answer))
    hits = sum(_fact_stated(f, ans_norm, ans_units, ans_nums) for f in facts)
    ref_units = {u for _, u in ref_nums}
    ref_values = {n for n, _ in ref_nums} | {p for n, _ in ref_nums for p in n.split("-")}
    wrong = sum(1 for n, u in ans_nums if u in ref_units and n not in ref_values
                and not set(n.split("-")) <= ref_values)
    return max(0.0, (hits - WRONG_NUMBER_COST * wrong) / len(facts))


def contradictions(answer: str, reference: str, lang: str) -> int:
    """Reference segments (clauses, split at commas and "and") the answer turns around (`_reversed`).
    A prohibition counts from one content unit ("not on a radiator"), an affirmation from two."""
    ans = polar_segments(answer, lang)
    return sum(1 for seg in polar_segments(reference, lang)
               if len(seg[0] | seg[1]) >= (1 if seg[1] else 2) and _reversed(seg, ans))


def self_contradictions(answer: str, lang: str = "en") -> int:
    """Sentence pairs of the answer with the same content (cues aside) but opposite polarity."""
    seen: dict[frozenset, str] = {}
    count = 0
    for sent in sentences(answer):
        pos, neg = scoped_units(sent, lang)
        key = frozenset(pos | neg)
        if len(key) < 2:
            continue
        pol = "negated" if neg else "affirmed"
        if key in seen and seen[key] != pol:
            count += 1
        seen.setdefault(key, pol)
    return count


def semantic_consistency(answer: str, item: dict[str, Any], ctx: Context) -> float:
    """Weighted F1 of answer-bearing content units against the reference, saturating at the level of
    a faithful paraphrase, minus a quarter per self-contradiction."""
    lang, question = _lang(item["lang"]), set(content_units(item["question"]))
    have, want = set(content_units(answer)) - question, set(content_units(item["answer"])) - question
    common = ctx.mass(have & want, lang)
    p = common / ctx.mass(have, lang) if have else 0.0
    r = common / ctx.mass(want, lang) if want else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return max(0.0, min(1.0, f1 / PARAPHRASE_F1) - 0.25 * self_contradictions(answer, lang))


def readability(answer: str, reference: str) -> float:
    """Well-formed, non-repeating, complete, sensibly long text (independent of content; the score
    is gated by relevance like the others)."""
    if not answer.strip():
        return 0.0
    rep = 1.0 - min(1.0, 2.0 * repetition_rate(answer))
    ending = 1.0 if answer.rstrip().endswith(_TERMINAL) else 0.4
    ratio = text_length(answer) / max(1, text_length(reference))
    if ratio <= 0:
        length = 0.0
    elif 0.6 <= ratio <= 1.8:
        length = 1.0
    else:  # falls off with the log-distance from the band
        length = max(0.0, 1 - abs(math.log(ratio / (0.6 if ratio < 0.6 else 1.8))))
    sents = sentences(answer)
    per = text_length(answer) / max(1, len(sents))
    lo, hi = (10, 120) if is_cjk(answer) else (6, 45)
    sentence = 1.0 if lo <= per <= hi else 0.4
    return 0.4 * rep + 0.2 * ending + 0.2 * length + 0.2 * sentence


@dataclass
class QuestionScore:
    id: str
    lang: str
    topic: str
    guard: bool
    relevance: float
    completeness: float
    key_data_accuracy: float
    semantic_consistency: float
    readability: float
    answer_length: int

    @property
    def composite(self) -> float:
        return round((self.completeness + self.key_data_accuracy + self.semantic_consistency + self.readability) / 4, 4)

    def to_dict(self) -> dict:
        return {**asdict(self), "composite": self.composite}


QUALITY_METRICS = ("completeness", "key_data_accuracy", "semantic_consistency", "readability")


def score_answer(item: dict[str, Any], answer: str, ctx: Context, guard: bool = False,
                 fixed: bool = False) -> QuestionScore:
    """`fixed`: the same answer was given to a different question (fixed_answers): relevance 0."""
    rel = 0.0 if fixed else relevance(answer, item, ctx)
    # an answer that turns the reference's advice around is not a rewording of it: every score shrinks
    rel *= max(0.0, 1.0 - CONTRADICTION_COST * contradictions(answer, item["answer"], _lang(item["lang"])))
    return QuestionScore(
        id=item["id"], lang=item["lang"], topic=item["topic"], guard=guard, relevance=round(rel, 4),
        completeness=to_score(rel * completeness(answer, item, ctx)),
        key_data_accuracy=to_score(rel * key_data_accuracy(answer, item)),
        semantic_consistency=to_score(rel * semantic_consistency(answer, item, ctx)),
        readability=to_score(rel * readability(answer, item["answer"])),
        answer_length=text_length(answer),
    )
