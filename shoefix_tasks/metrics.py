"""The seed's scorecard, made deterministic and reference-based (definitions: docs/scorecard.md).

Every score is on the seed's 1-10 scale: 1 + 9 * (a fraction in [0, 1]). Text is compared as
*content units*: for English, lower-cased word stems without stop words; for Chinese, character
bigrams (no word segmenter needed, robust to zh-TW wording) plus any Latin words and numbers.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_SENT_SPLIT = re.compile(r"(?<=[.!?。！？])\s*")
_TERMINAL = tuple(".!?。！？)」』\"'")
_NEGATION = re.compile(r"\b(?:not|never|no|don't|doesn't|cannot|can't|avoid)\b|不|勿|別|避免|禁止")
STOP = frozenset("""a an the and or but if then so of to in on at by for with from as is are was were be been
being it its this that these those there their they them you your yours we our i me my he she his her do does
did can could should would will may might must have has had not no than too very just also about into over
under more most less such each any all some what which who whom when where why how up out off only own same
other both few one two s t""".split())
# Units a key fact may carry; numbers are compared per unit so "60%" never matches "60 °C".
_UNIT = (r"%|°c|°f|mg/kg|mg|ml|km|miles?|hours?|hrs?|days?|weeks?|months?|years?|minutes?|g\b|"
         r"小時|天|週|周|個月|年|分鐘|公里|公克|毫升")
_NUM_UNIT = re.compile(rf"(\d+(?:\.\d+)?)(?:\s*[–\-~至到]\s*(\d+(?:\.\d+)?))?\s*({_UNIT})")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("‒", "–").replace("—", "–").replace("−", "-")
    return re.sub(r"\s+", " ", text).strip()


def _stem(word: str) -> str:
    for suffix in ("ing", "edly", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_units(text: str) -> list[str]:
    """Stems for Latin text, character bigrams for CJK runs."""
    text = normalize(text)
    units = [_stem(w) for w in _WORD.findall(text) if w not in STOP]
    cjk = "".join(ch if _CJK.match(ch) else " " for ch in text).split()
    for run in cjk:
        units.extend(run[i:i + 2] for i in range(len(run) - 1)) if len(run) > 1 else units.append(run)
    return units


def is_cjk(text: str) -> bool:
    return len(_CJK.findall(text)) > 0.2 * max(1, len(text.strip()))


def to_score(fraction: float) -> float:
    return round(1.0 + 9.0 * min(1.0, max(0.0, fraction)), 3)


def _unit_key(unit: str) -> str:
    unit = unit.rstrip("s") if unit not in ("%",) else unit
    return {"hr": "hour", "hrs": "hour", "mile": "mile", "周": "週"}.get(unit, unit)


def numbers_with_units(text: str) -> set[tuple[str, str]]:
    """{(number or range, unit)} stated in the text, e.g. {("24-48", "hour"), ("60", "%")}."""
    found = set()
    for lo, hi, unit in _NUM_UNIT.findall(normalize(text)):
        found.add((f"{lo}-{hi}" if hi else lo, _unit_key(unit)))
    return found


def completeness(answer: str, reference: str, key_points: list[str] | None) -> float:
    """Share of the reference's key points covered; a point is covered when at least 60% of its
    content units appear in the answer."""
    have = set(content_units(answer))
    points = [p for p in (key_points or []) if content_units(p)]
    if not points:  # fall back to recall of the reference's content units
        ref = set(content_units(reference))
        return to_score(len(ref & have) / len(ref)) if ref else 1.0
    covered = sum(1 for p in points if len(set(content_units(p)) & have) / len(set(content_units(p))) >= 0.6)
    return to_score(covered / len(points))


def key_data_accuracy(answer: str, reference: str, key_facts: list[str] | None) -> float:
    """Key facts stated correctly, minus half a fact for each contradicting number.

    A fact is stated when its normalized text occurs in the answer, or (for numeric facts) the
    answer states the same number with the same unit. A *contradiction* is a number the answer
    gives in a unit the reference quantifies, matching none of the reference's values in that unit.
    """
    facts = [f for f in (key_facts or []) if f.strip()]
    ref_nums = numbers_with_units(reference)
    if not facts:
        facts = [f"{n} {u}" for n, u in sorted(ref_nums)]
    if not facts:
        return 10.0 if not numbers_with_units(answer) else 5.5  # nothing to get right
    ans_norm = normalize(answer)
    ans_nums = numbers_with_units(answer)
    hits = 0
    for fact in facts:
        fact_nums = numbers_with_units(fact)
        if normalize(fact) in ans_norm or (fact_nums and fact_nums <= ans_nums):
            hits += 1
    ref_units = {u for _, u in ref_nums}
    ref_values = {n for n, _ in ref_nums} | {p for n, _ in ref_nums for p in n.split("-")}
    contradictions = sum(1 for n, u in ans_nums if u in ref_units and n not in ref_values
                         and not set(n.split("-")) <= ref_values)
    return to_score((hits - 0.5 * contradictions) / len(facts))


def _cosine(a: Counter, b: Counter) -> float:
    dot = sum(v * b[k] for k, v in a.items() if k in b)
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text) if s.strip()]


def self_contradictions(answer: str) -> int:
    """Sentence pairs with the same content but opposite polarity ("Use bleach." / "Never use bleach.")."""
    seen: dict[frozenset, bool] = {}
    count = 0
    for sent in _sentences(answer):
        key = frozenset(u for u in content_units(_NEGATION.sub(" ", normalize(sent))))
        if len(key) < 2:
            continue
        neg = bool(_NEGATION.search(normalize(sent)))
        if key in seen and seen[key] != neg:
            count += 1
        seen.setdefault(key, neg)
    return count


def semantic_consistency(answer: str, reference: str) -> float:
    """Cosine similarity of content-unit counts (unigrams + bigrams of units), scaled so that 0.6
    scores 10, minus 2 points per self-contradiction."""
    def grams(text: str) -> Counter:
        units = content_units(text)
        return Counter(units) + Counter(zip(units, units[1:], strict=False))

    cos = _cosine(grams(answer), grams(reference))
    return round(max(1.0, to_score(cos / 0.6) - 2.0 * self_contradictions(answer)), 3)


def repetition_rate(answer: str) -> float:
    """Share of repeated word 3-grams (character 4-grams for Chinese): 0 for fresh text."""
    text = normalize(answer)
    if is_cjk(text):
        grams = [text[i:i + 4] for i in range(len(text) - 3)]
    else:
        words = text.split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def text_length(text: str) -> int:
    """Words for Latin text; CJK characters count as words (zh-TW answers ~ 1.6 chars per EN word)."""
    return len(_CJK.findall(text)) + len(_WORD.findall(_CJK.sub(" ", normalize(text))))


def readability(answer: str, reference: str) -> float:
    """Well-formed, non-repeating, complete, sensibly long text, independent of content."""
    if not answer.strip():
        return 1.0
    rep = 1.0 - min(1.0, 2.0 * repetition_rate(answer))
    ending = 1.0 if answer.rstrip().endswith(_TERMINAL) else 0.4
    ratio = text_length(answer) / max(1, text_length(reference))
    if ratio <= 0:
        length = 0.0  # only punctuation or symbols
    elif 0.35 <= ratio <= 2.0:
        length = 1.0
    else:  # falls off with the log-distance from the band: 1/e of the bound scores 0
        length = max(0.0, 1 - abs(math.log(ratio / (0.35 if ratio < 0.35 else 2.0))))
    sents = _sentences(answer)
    per = text_length(answer) / max(1, len(sents))
    lo, hi = (10, 90) if is_cjk(answer) else (6, 35)
    sentence = 1.0 if lo <= per <= hi else 0.4
    return to_score(0.4 * rep + 0.2 * ending + 0.2 * length + 0.2 * sentence)


@dataclass
class QuestionScore:
    id: str
    lang: str
    topic: str
    guard: bool
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


def score_answer(item: dict, answer: str, guard: bool = False) -> QuestionScore:
    ref = item["answer"]
    return QuestionScore(
        id=item["id"], lang=item["lang"], topic=item["topic"], guard=guard,
        completeness=completeness(answer, ref, item.get("key_points")),
        key_data_accuracy=key_data_accuracy(answer, ref, item.get("key_facts")),
        semantic_consistency=semantic_consistency(answer, ref),
        readability=readability(answer, ref),
        answer_length=text_length(answer),
    )
