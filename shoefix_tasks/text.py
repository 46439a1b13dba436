"""Text as the scorecard sees it: content units, numbers with their units, sentences, lengths.

English text becomes lower-cased word stems without stop words; Chinese text becomes character
bigrams (no word segmenter needed, robust to zh-TW wording) plus any Latin words and numbers.
Numbers are read with their unit ("24–48 hours", "60 °C", "70%", "24 小時"), so "60%" never matches
"60 °C" and a paraphrase may write "24 to 48 hours" or "two weeks".
"""

from __future__ import annotations

import re
import unicodedata

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_SENT_SPLIT = re.compile(r"(?<=[.!?。！？])\s*")
STOP = frozenset("""a an the and or but if then so of to in on at by for with from as is are was were be been
being it its this that these those there their they them you your yours we our i me my he she his her do does
did can could should would will may might must have has had not no than too very just also about into over
under more most less such each any all some what which who whom when where why how up out off only own same
other both few one two s t""".split())
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_UNIT = (r"%|percent|°c|°f|degrees? c(?:elsius)?|degrees? f(?:ahrenheit)?|mg/kg|mg|ml|km|miles?|hours?|hrs?|"
         r"days?|weeks?|months?|years?|minutes?|mins?|g\b|小時|天|週|周|個月|年|分鐘|公里|公克|毫升")
_RANGE = r"(?:\s*(?:[–\-~至到]|to|and)\s*)"
_NUM_UNIT = re.compile(rf"(?:between\s+)?(\d+(?:\.\d+)?)(?:{_RANGE}(\d+(?:\.\d+)?))?\s*(?:-\s*)?({_UNIT})")
_UNIT_KEY = {"hr": "hour", "hrs": "hour", "min": "minute", "mins": "minute", "mile": "mile", "周": "週",
             "percent": "%"}


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("‒", "–").replace("—", "–").replace("−", "-").replace("° ", "°")
    return re.sub(r"\s+", " ", text).strip()


_SUFFIXES = (("ational", "at"), ("ations", "at"), ("ation", "at"), ("ization", "iz"), ("fulness", "ful"),
             ("ousness", "ous"), ("iveness", "iv"), ("ments", ""), ("ment", ""), ("ness", ""), ("able", ""),
             ("ible", ""), ("ings", ""), ("ing", ""), ("edly", ""), ("ies", "i"), ("ied", "i"), ("ions", ""),
             ("ion", ""), ("ers", ""), ("er", ""), ("ed", ""), ("es", ""), ("ly", ""), ("al", ""), ("e", ""),
             ("s", ""))


def stem(word: str) -> str:
    """A light suffix stemmer (no dictionary): "rotation", "rotate" and "rotating" share "rotat";
    "dry", "dried" and "drying" share "dri". Numbers are left alone."""
    if word[:1].isdigit() or len(word) < 3:
        return word
    for suffix, repl in _SUFFIXES:
        if len(word) - len(suffix) >= 3 and word.endswith(suffix):
            word = word[: -len(suffix)] + repl
            break
    if word.endswith("y"):
        word = word[:-1] + "i"
    return word[:-1] if len(word) >= 4 and word[-1] == word[-2] and word[-1] not in "lsz" else word


def content_units(text: str) -> list[str]:
    """Stems for Latin text, character bigrams for CJK runs, in text order."""
    text = normalize(text)
    units = [stem(w) for w in _WORD.findall(text) if w not in STOP]
    for run in "".join(ch if CJK.match(ch) else " " for ch in text).split():
        units.extend(run[i:i + 2] for i in range(len(run) - 1)) if len(run) > 1 else units.append(run)
    return units


def score_units(text: str) -> list[str]:
    """Content units for scoring: as `content_units`, plus single CJK characters, so a Chinese
    paraphrase that reorders words still shares most of its meaning-bearing characters (rarity
    weights keep common characters cheap)."""
    units = content_units(text)
    units.extend(ch for ch in normalize(text) if CJK.match(ch))
    return units


def is_cjk(text: str) -> bool:
    return len(CJK.findall(text)) > 0.2 * max(1, len(text.strip()))


def _unit_key(unit: str) -> str:
    if unit.startswith("degree"):
        return "°f" if "f" in unit.split()[-1] else "°c"
    if unit not in ("%",):
        unit = unit.rstrip("s") if unit.endswith("s") and len(unit) > 2 else unit
    return _UNIT_KEY.get(unit, unit)


def spell_numbers(text: str) -> str:
    """ "two weeks" -> "2 weeks" (number words only where a unit follows)."""
    pattern = rf"\b({'|'.join(_NUMBER_WORDS)})(?=\s*(?:{_RANGE}\w+\s*)?(?:{_UNIT}))"
    return re.sub(pattern, lambda m: _NUMBER_WORDS[m.group(1).lower()], text, flags=re.I)


def numbers_with_units(text: str) -> set[tuple[str, str]]:
    """{(number or range, unit)} stated in the text, e.g. {("24-48", "hour"), ("60", "%")}."""
    found = set()
    for lo, hi, unit in _NUM_UNIT.findall(spell_numbers(normalize(text))):
        found.add((f"{lo}-{hi}" if hi else lo, _unit_key(unit)))
    return found


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text) if s.strip()]


def text_length(text: str) -> int:
    """Words for Latin text; CJK characters count as words (zh-TW answers ~ 1.6 chars per EN word)."""
    return len(CJK.findall(text)) + len(_WORD.findall(CJK.sub(" ", normalize(text))))


def repetition_rate(answer: str) -> float:
    """Share of repeated word 3-grams (character 4-grams for Chinese): 0 for fresh text."""
    text = normalize(answer)
    if is_cjk(text):
        grams = [text[i:i + 4] for i in range(len(text) - 3)]
    else:
        words = text.split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0
