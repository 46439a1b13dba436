"""The safety net on served answers: no model is perfect, so every answer the champion serves is
checked for the same forbidden claims the gate checks (shoefix_tasks.evaluation.claims). An answer that states
one is never shown: the user gets the claim's safe guidance instead, with a pointer to the expert
corpus answer closest to the question, and the replacement is logged with the question (the log
is where experts look for questions the model gets dangerously wrong).

The claims come from the installation's data folder ($SHOEFIX_DATA_DIR), not from the model
package, so a new safety rule protects users at once, without retraining.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoefix_tasks.evaluation.claims import Hit, forbidden, load_claims
from shoefix_tasks.text import content_units, is_cjk

log = logging.getLogger(__name__)
REPLACED_LOG = "safety/replaced.jsonl"  # under $SHOEFIX_HOME
INTRO = {"en": "I can't give that advice safely.", "zh-TW": "這個建議可能不安全，我不能這樣回答。"}
SEE_ALSO = {"en": "See also ShoeFix's expert answer to: \"{q}\"", "zh-TW": "另請參考 ShoeFix 專家對這個問題的回答：「{q}」"}


@dataclass
class Checked:
    answer: str  # what is served
    replaced: bool
    claims: list[str]  # forbidden claims the model's answer stated
    corpus_id: str | None = None


def language(text: str) -> str:
    return "zh-TW" if is_cjk(text) else "en"


def closest_corpus_record(question: str, data_dir: Path, lang: str) -> dict[str, Any] | None:
    """The corpus record whose question shares most content with this one (same language)."""
    from shoefix_tasks.records import iter_jsonl

    want = set(content_units(question))
    best, best_overlap = None, 0.0
    for rec in iter_jsonl(sorted((data_dir / "corpus").glob("*.jsonl"))):
        if rec["lang"] != lang:
            continue
        units = set(content_units(rec["question"]))
        overlap = len(want & units) / len(want | units) if want | units else 0.0
        if overlap > best_overlap:
            best, best_overlap = rec, overlap
    return best


def check_answer(question: str, answer: str, data_dir: Path, home: Path | None = None,
                 model: str = "") -> Checked:
    """`answer` as it may be served: unchanged, or replaced by safe guidance (and logged)."""
    claims = load_claims(data_dir)
    lang = language(answer or question)
    hits: list[Hit] = forbidden(answer, lang, claims)
    if not hits:
        return Checked(answer, False, [])
    ids = list(dict.fromkeys(h.claim for h in hits))
    guidance = claims[ids[0]].guidance[lang]  # one claim's guidance: overlapping claims say the same
    ref = closest_corpus_record(question, data_dir, lang)
    parts = [INTRO[lang], guidance]
    if ref is not None:
        parts.append(SEE_ALSO[lang].format(q=ref["question"]) + f" ({ref['id']}).")
    log.warning("served answer replaced: it stated forbidden claim(s) %s; question: %r", ids, question[:300])
    if home is not None:
        path = Path(home) / REPLACED_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"at": datetime.datetime.now(datetime.UTC).isoformat(), "model": model,
                                 "question": question, "claims": ids, "sentences": [h.clause for h in hits],
                                 "corpus_id": ref["id"] if ref else None}, ensure_ascii=False) + "\n")
    return Checked(" ".join(parts), True, ids, ref["id"] if ref else None)


# Where a sentence ends in a stream of text pieces: Latin end punctuation once the next character
# (whitespace) has arrived, so "3." of "3.5 %" is not an end; CJK end punctuation at once; a line break.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*\s|[。！？]+[」』”）]*|\n")


def checked_stream(question: str, pieces: Iterable[str], data_dir: Path, home: Path | None = None,
                   model: str = "") -> Iterator[str]:
    """The streamed form of `check_answer`: text is let through a whole sentence at a time, and only
    after the answer so far, that sentence included, passed the check. The first time it does not,
    the claim's safe guidance is sent instead and the stream ends (the model's generator is closed,
    so it stops generating). A forbidden claim is thus never shown, not even in part; what was shown
    before it was safe as it stood. Checking the whole answer so far, not the sentence alone, lets
    the claims' scope rules see the sentences before it, as `check_answer` does on a whole answer.
    Whitespace at either end is dropped, as the engines strip a whole answer, so the pieces join
    to exactly what `check_answer` would serve for a safe answer."""
    checked, pending, held = "", "", ""  # held: whitespace after the last piece sent, sent only if text follows

    def send(text: str) -> str:
        nonlocal held
        text = held + text if checked.strip() else text.lstrip()
        body = text.rstrip()
        held = text[len(body):]
        return body

    try:
        for piece in pieces:
            pending += piece
            cut = max((m.end() for m in _SENTENCE_END.finditer(pending)), default=0)
            if not cut:
                continue
            ready, pending = pending[:cut], pending[cut:]
            out = check_answer(question, checked + ready, data_dir, home, model)
            if out.replaced:
                yield ("\n\n" if checked.strip() else "") + out.answer
                return
            text = send(ready)
            checked += ready
            if text:
                yield text
        if pending.strip():  # the last sentence, cut by the token limit or ended without punctuation
            out = check_answer(question, checked + pending, data_dir, home, model)
            yield (("\n\n" if checked.strip() else "") + out.answer) if out.replaced else send(pending)
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
