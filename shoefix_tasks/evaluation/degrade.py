"""Systematic degradations of a reference answer, for the scorecard's meta-evaluation.

A metric is a claim: the scorecard says "this answer is better than that one". These functions make
answers we *know* are worse than the reference, in the ways a model goes wrong, so the claim can be
tested (shoefix_tasks.evaluation.meta_eval): every number changed to a wrong value in its unit, the safety advice
reversed, another question's answer, a fixed boilerplate of common facts, the question repeated back,
the answer cut at half, and nothing at all. Each is deterministic.
"""

from __future__ import annotations

import re

from shoefix_tasks.evaluation.claims import EN_KEEP_AWAY, EN_OBJECT_CUES, EN_PSEUDO, ZH_PSEUDO
from shoefix_tasks.text import spell_numbers

# A number (or range) followed by a unit the scorecard compares (same units as metrics._UNIT).
_NUM = r"\d+(?:\.\d+)?"
_UNITS = (r"%|°\s?C|°\s?F|mg/kg|mg|mL|ml|km|miles?|hours?|hrs?|days?|weeks?|months?|years?|minutes?|g\b|"
          r"小時|天|週|周|個月|年|分鐘|公里|公克|毫升")
NUM_WITH_UNIT = re.compile(rf"(?P<lo>{_NUM})(?:(?P<sep>\s*(?:[–\-~至到]|to)\s*)(?P<hi>{_NUM}))?(?P<sp>\s*)(?P<unit>{_UNITS})")

BOILERPLATE = {
    "en": ("Mold grows on shoes when moisture, warmth and organic residue come together, so the key is to keep them "
           "dry and clean. Dry wet shoes within 24–48 hours at room temperature, about 20–25 °C, stuffed with "
           "newspaper, and never with direct heat above 40 °C. Keep storage below 60% relative humidity, ideally "
           "30–50%, with silica gel and good airflow. Clean visible mold outdoors with gloves and an N95 mask, "
           "using 70% isopropyl alcohol or a 1:1 mix of white vinegar and water, and never mix bleach with "
           "other cleaners. Rotate pairs so each dries for at least 24 hours, and wash socks at 60 °C."),
    "zh-TW": ("鞋子發黴是因為濕氣、溫度和有機殘留物同時存在，所以關鍵是保持乾燥和清潔。濕掉的鞋子要在 24–48 小時內，"
              "在約 20–25 °C 的室溫下塞報紙風乾，絕對不要用超過 40 °C 的直接熱源。收納環境的相對濕度要保持在 60% 以下，"
              "最好是 30–50%，並搭配矽膠乾燥劑和良好通風。清除看得到的黴菌要在戶外進行，戴手套和 N95 口罩，"
              "使用 70% 異丙醇或白醋與水 1:1 的混合液，而且絕對不要把漂白水和其他清潔劑混用。"
              "鞋子輪流穿，讓每雙至少乾燥 24 小時，襪子用 60 °C 清洗。"),
}


def _wrong(value: str, unit: str, taken: set[str]) -> str:
    """A wrong value in the same unit: three times the right one (a third of it for percentages
    that would pass 100), with the same number of decimals; never the input nor any value the text
    states in that unit (`taken`)."""
    v = float(value)
    decimals = len(value.split(".")[1]) if "." in value else 0
    new = v * 3 if v else 5.0
    if unit.strip() == "%" and new > 100:
        new = v / 3
    text = f"{new:.{decimals}f}"
    step = 10 ** -decimals
    while text == value or text in taken:
        new += step
        text = f"{new:.{decimals}f}"
    return text


def wrong_numbers(text: str) -> str | None:
    """Every number with a unit changed to a wrong value in that unit; None if the text has none."""
    text = spell_numbers(text)  # "three days" counts as a number too
    taken: dict[str, set[str]] = {}
    for m in NUM_WITH_UNIT.finditer(text):
        taken.setdefault(m["unit"].replace(" ", ""), set()).update(v for v in (m["lo"], m["hi"]) if v)

    def repl(m: re.Match) -> str:
        unit = m["unit"]
        values = taken[unit.replace(" ", "")]
        lo = _wrong(m["lo"], unit, values)
        hi = f"{m['sep']}{_wrong(m['hi'], unit, values)}" if m["hi"] else ""
        return f"{lo}{hi}{m['sp']}{unit}"

    out, n = NUM_WITH_UNIT.subn(repl, text)
    return out if n else None


# -- reversing advice ----------------------------------------------------------------------------

_EN_REMOVE = [  # (pattern, replacement), applied in order; word boundaries, case-insensitive
    (r"\bneither\b(.*?)\bnor\b", r"both\1and"),
    (r"\bunder no circumstances\b,? ?", ""), (r"\bby no means\b ?", ""), (r"\bout of the question\b", "fine"),
    (r"\brefrain from\b", "go ahead with"), (r"\bresist the urge to\b ?", ""), (r"\bhold off on\b", "go ahead with"),
    (r"\bhold off\b", "go ahead"), (r"\b(?:stay|keep|well) away from\b", "right next to"),
    (r"\baway from\b", "next to"),
    (r"\b(" + "|".join(sorted(c[0] for c in EN_OBJECT_CUES if c[1:] == ("against",))) + r") against\b",
     r"\1 in favour of"), (r"\bsteer clear of\b", "use"), (r"\bclear of\b", "next to"),
    (r"\bno need to\b", "you need to"), (r"\bskip\b", "do"), (r"\bforgo\b", "use"),
    (r"\b(?:do|does|did) not\b ?", ""), (r"\b(?:don't|doesn't|didn't)\b ?", ""),
    (r"\bis not\b", "is"), (r"\bisn't\b", "is"), (r"\bare not\b", "are"), (r"\baren't\b", "are"),
    (r"\bwas not\b", "was"), (r"\bwasn't\b", "was"), (r"\bweren't\b", "were"),
    (r"\bcannot\b", "can"), (r"\bcan't\b", "can"), (r"\bcan not\b", "can"), (r"\bcouldn't\b", "could"),
    (r"\bwon't\b", "will"), (r"\bwouldn't\b", "would"), (r"\bshouldn't\b", "should"), (r"\bshould not\b", "should"),
    (r"\bmust not\b", "must"), (r"\bmustn't\b", "must"), (r"\bneed not\b", "need to"), (r"\bneedn't\b", "need to"),
    (r"\bnever\b ?", ""), (r"\bnot\b ?", ""), (r"\bwithout\b", "with"), (r"\bavoid(?:ing)?\b", "use"),
    (r"\brather than\b", "as well as"), (r"\binstead of\b", "as well as"), (r"\bno\b,? ?", ""),
    (r"\bnone of\b", "all of"), (r"\bnothing\b", "something"),
]
_EN_AUX = re.compile(r"\b(is|are|can|should|will|must|may|does|do)\b", re.I)
_ZH_REMOVE = [("無法", "可以"), ("沒辦法", "可以"), ("沒用", "有用"), ("避開", "靠近"), ("不行", "可以"), ("千萬不要", ""), ("絕對不要", ""), ("絕不要", ""), ("絕不", ""), ("不要", ""), ("不可以", "可以"),
              ("不可", "可"), ("不能", "能"), ("不應該", "應該"), ("不應", "應"), ("不該", "該"), ("不宜", "宜"),
              ("不必", "要"), ("不需要", "需要"), ("不用", "要"), ("不得", "得"), ("不准", "准"), ("切勿", ""),
              ("勿", ""), ("別", ""), ("避免", "使用"), ("禁止", "建議"), ("沒有", "有"), ("無須", "要"),
              ("並非", "是"), ("而不是", "也"), ("而非", "也"), ("不是", "是"), ("不會", "會"), ("不", "")]
_ZH_AUX = re.compile(r"會|能|可以|應該|要|是")


def _protect(text: str, pseudo: list[str]) -> tuple[str, dict[str, str]]:
    """Hide pseudo-negations ("not only", 不同) behind placeholders so reversing leaves them alone."""
    keep: dict[str, str] = {}
    for i, p in enumerate(sorted(pseudo, key=len, reverse=True)):
        token = f"\x00{i}\x00"
        pattern = re.compile(r"\b" + re.escape(p) + r"\b", re.I) if p.isascii() else re.compile(re.escape(p))
        if pattern.search(text):
            keep[token] = p
            text = pattern.sub(lambda m, t=token: (keep.__setitem__(t, m.group(0)), t)[1], text)
    return text, keep


def _unprotect(text: str, keep: dict[str, str]) -> str:
    for token, original in keep.items():
        text = text.replace(token, original)
    return text


def reverse_advice(text: str, lang: str) -> str:
    """The advice turned around: every negation removed ("Don't pop the blister" -> "pop the blister",
    不要泡腳 -> 泡腳); if the answer has no negation at all, one added to each of its first two sentences."""
    if lang.startswith("zh"):
        body, keep = _protect(text, list(ZH_PSEUDO))
        out = body
        for cue, repl in _ZH_REMOVE:
            out = out.replace(cue, repl)
        if out == body:
            parts = re.split(r"(?<=[。！？])", body)
            for i in range(min(2, len(parts))):
                m = _ZH_AUX.search(parts[i])
                parts[i] = (parts[i][:m.start()] + "不" + parts[i][m.start():]) if m else "不要" + parts[i]
            out = "".join(parts)
        return _unprotect(out, keep)
    body, keep = _protect(text, [" ".join(p) for p in EN_PSEUDO])
    # "keep them off heaters" -> "keep them on heaters": the detector's keep-away cue (claims.EN_KEEP_AWAY)
    out = EN_KEEP_AWAY.sub(lambda m: m.group(0)[:m.start(1) - m.start()] + ("on" if m[1].lower() == "off" else "in"),
                           body)
    for pattern, repl in _EN_REMOVE:
        out = re.sub(pattern, repl, out, flags=re.I)
    if out == body:
        parts = re.split(r"(?<=[.!?])\s+", body)
        for i in range(min(2, len(parts))):
            m = _EN_AUX.search(parts[i])
            parts[i] = (parts[i][:m.end()] + " not" + parts[i][m.end():]) if m else "Do not " + parts[i][:1].lower() + parts[i][1:]
        out = " ".join(parts)
    out = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), _unprotect(out, keep))
    return re.sub(r" {2,}", " ", out).strip()


def half(text: str) -> str:
    """The first half of the answer (by words, or characters for Chinese), cut mid-flow."""
    if re.search(r"[\u3400-\u9fff]", text):
        return text[: len(text) // 2]
    words = text.split()
    return " ".join(words[: len(words) // 2])


def other_answer(items: list[dict], index: int) -> str:
    """Another question's reference in the same language: the item half-way round the list, so the
    pairing is fixed and never the same question (nor its translation)."""
    same = [i for i, it in enumerate(items) if it["lang"] == items[index]["lang"]]
    pos = same.index(index)
    for step in range(len(same) // 2, len(same)):
        j = same[(pos + step) % len(same)]
        if items[j]["qid"] != items[index]["qid"]:
            return items[j]["answer"]
    raise ValueError("need at least two questions in a language")


def degradations(items: list[dict], index: int) -> dict[str, str | None]:
    """Every degraded version of item `index`'s reference (None where a kind does not apply)."""
    it = items[index]
    lang = "zh-TW" if it["lang"].startswith("zh") else "en"
    return {
        "wrong_numbers": wrong_numbers(it["answer"]),
        "reversed": reverse_advice(it["answer"], lang),
        "other_answer": other_answer(items, index),
        "boilerplate": BOILERPLATE[lang],
        "question": it["question"],
        "half": half(it["answer"]),
        "empty": "",
    }
