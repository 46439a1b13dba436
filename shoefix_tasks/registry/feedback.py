"""An expert marks a served answer wrong and writes the right one: MLflow feedback plus a candidate record.

Two things happen, and neither replaces the other:
- On the answer's MLflow trace: `mlflow.log_feedback` (name `correct`, value False, the reviewer as a
  HUMAN source, their reason as the rationale) and `mlflow.log_expectation` (`expected_response`: the
  corrected answer), so the trace UI shows what was wrong and what is right. If the answer has not
  reached MLflow yet (its trace waits in the answer log), the assessment waits with it in
  `<home>/answers/feedback-pending.jsonl` and `attach_pending` logs it once the trace exists.
- A candidate record in the inbox, `feedback/<answer id>-<n>.jsonl`: the question as served (PII
  already removed), the corrected answer, and `provenance` (trace id, answer id, model version,
  reviewer, source, the rejected answer). It goes through the same collect and validation as any
  other file: Great Expectations, screening, near-duplicate and holdout-leak checks. There is no path
  around them, and a correction that fails them is quarantined with its reason like any record.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoefix_tasks.config import LANGS, TOPICS, Settings
from shoefix_tasks.errors import PermanentError
from shoefix_tasks.intake.asked import taught_corpus
from shoefix_tasks.intake.leak import ParaphraseIndex
from shoefix_tasks.intake.screening import detect_language
from shoefix_tasks.registry import answer_log

FEEDBACK_DIR = "feedback"  # under the inbox
MAX_ANSWER_CHARS = 8000  # the longest corpus answer is ~2,000 characters: room for a thorough correction
MAX_FIELD_CHARS = 500


class FeedbackError(PermanentError):
    """A correction that cannot be taken as given (unknown answer, empty or oversized fields)."""


@dataclass(frozen=True)
class Correction:
    answer_id: str
    corrected_answer: str
    source: str  # where the right answer comes from: a citation, a URL, a SOURCES.md key
    reviewer: str  # the signed-in user (the page) or the operator (the CLI)
    reason: str = ""
    topic: str | None = None  # default: the topic of the corpus question closest to the served one

    def __post_init__(self) -> None:
        if not self.corrected_answer.strip():
            raise FeedbackError("the corrected answer is empty")
        if len(self.corrected_answer) > MAX_ANSWER_CHARS:
            raise FeedbackError(f"the corrected answer is longer than {MAX_ANSWER_CHARS} characters")
        for name in ("source", "reviewer"):
            value = getattr(self, name).strip()
            if not value:
                raise FeedbackError(f"a correction needs a {name}")
            if len(value) > MAX_FIELD_CHARS:
                raise FeedbackError(f"{name} is longer than {MAX_FIELD_CHARS} characters")
        if self.topic is not None and self.topic not in TOPICS:
            raise FeedbackError(f"unknown topic {self.topic!r}; one of {', '.join(TOPICS)}")


def _closest_topic(settings: Settings, question: str) -> str:
    corpus = taught_corpus(settings)
    key, _ = ParaphraseIndex(corpus).closest(question)
    by_id = {r["id"]: r["topic"] for r in corpus}
    return by_id.get(key or "", "mechanisms")


def _write_inbox(settings: Settings, name: str, record: dict[str, Any]) -> str:
    """Write under a name intake skips (`.tmp`), then rename: collect never sees half a file."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(settings.inbox)
    folder = f"{root.rstrip('/')}/{FEEDBACK_DIR}"
    fs.makedirs(folder, exist_ok=True)
    final, tmp = f"{folder}/{name}.jsonl", f"{folder}/{name}.jsonl.tmp"
    with fs.open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    fs.mv(tmp, final)
    return f"{FEEDBACK_DIR}/{name}.jsonl"


def _log_assessments(trace_id: str, c: Correction) -> None:
    import mlflow
    from mlflow.entities import AssessmentSource

    source = AssessmentSource(source_type="HUMAN", source_id=c.reviewer)
    mlflow.log_feedback(trace_id=trace_id, name="correct", value=False, source=source,
                        rationale=c.reason or "marked wrong by a reviewer", metadata={"source": c.source})
    mlflow.log_expectation(trace_id=trace_id, name="expected_response", value=c.corrected_answer, source=source,
                           metadata={"source": c.source})


def submit(settings: Settings, c: Correction) -> dict[str, Any]:
    """Record a correction; returns where it went. Raises FeedbackError for an unknown answer."""
    from shoefix_tasks.store import tracking

    entry = answer_log.find_answer(settings, c.answer_id)
    if entry is None:
        raise FeedbackError(f"no served answer {c.answer_id!r} in the answer log")
    lang = detect_language(c.corrected_answer)
    if lang not in LANGS:
        lang = detect_language(entry["question"])
        lang = lang if lang in LANGS else "en"
    existing = _feedback_names(settings, c.answer_id)
    name = f"{c.answer_id}-{len(existing) + 1}"
    trace_id = entry.get("trace_id")
    record = {"id": f"fb-{c.answer_id[:16]}-{len(existing) + 1}-{lang}", "qid": f"fb-{c.answer_id[:16]}",
              "question": entry["question"], "answer": c.corrected_answer.strip(),
              "topic": c.topic or _closest_topic(settings, entry["question"]), "lang": lang,
              "source": [c.source.strip()], "contributor": c.reviewer.strip(), "created": time.strftime("%Y-%m-%d"),
              "provenance": {"kind": "feedback", "answer_id": c.answer_id, "trace_id": trace_id,
                             "model_version": entry["model_version"], "reviewer": c.reviewer.strip(),
                             "source": c.source.strip(), "reason": c.reason.strip(),
                             "rejected_answer": entry["answer"], "submitted_at": time.time()}}
    path = _write_inbox(settings, name, record)  # first: the expert's work is kept whatever MLflow does
    logged = False
    if trace_id:
        try:
            tracking.configure(settings)
            _log_assessments(trace_id, c)
            logged = True
        except Exception:  # noqa: BLE001 - MLflow down: log it later, the record is already in the inbox
            pass
    if not logged:
        folder = answer_log.log_dir(settings)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "feedback-pending.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"answer_id": c.answer_id, "correction": c.__dict__}, ensure_ascii=False) + "\n")
    return {"inbox_file": path, "record_id": record["id"], "trace_id": trace_id, "feedback_logged": logged}


def attach_pending(settings: Settings) -> int:
    """Log the assessments of corrections whose answer has reached MLflow since; how many were logged."""
    from shoefix_tasks.store import tracking

    path = answer_log.log_dir(settings) / "feedback-pending.jsonl"
    if not path.exists():
        return 0
    waiting = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    left, done = [], 0
    for item in waiting:
        entry = answer_log.find_answer(settings, item["answer_id"]) or {}
        try:
            if not entry.get("trace_id"):
                raise LookupError("trace not sent yet")
            tracking.configure(settings)
            _log_assessments(entry["trace_id"], Correction(**item["correction"]))
            done += 1
        except Exception:  # noqa: BLE001 - keep it for the next flush
            left.append(item)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in left), encoding="utf-8")
    tmp.replace(path)
    return done


def _feedback_names(settings: Settings, answer_id: str) -> list[str]:
    return [r["id"] for r in list_feedback(settings) if r.get("provenance", {}).get("answer_id") == answer_id]


def list_feedback(settings: Settings) -> list[dict[str, Any]]:
    """The correction records in the inbox (collected or not: the inbox keeps its files), oldest first."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(settings.inbox)
    folder = f"{root.rstrip('/')}/{FEEDBACK_DIR}"
    if not fs.exists(folder):
        return []
    out = []
    for path in sorted(fs.find(folder)):
        if path.endswith(".jsonl"):
            with fs.open(path, "r", encoding="utf-8") as fh:
                out += [{**json.loads(line), "_file": Path(path).name} for line in fh if line.strip()]
    return sorted(out, key=lambda r: r.get("provenance", {}).get("submitted_at", 0))


def intake_status(settings: Settings, record_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each correction record's latest ledger row: accepted / quarantined (with the reason) / collected;
    absent when no run has collected it yet."""
    import sqlalchemy as sa

    from shoefix_tasks.store import ledger

    if not record_ids:
        return {}
    engine = ledger.engine_for(settings.ledger_url)
    t = ledger.records
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.record_id, t.c.status, t.c.reason, t.c.batch_id)
                            .where(t.c.record_id.in_(record_ids)).order_by(t.c.row_id)).mappings().all()
    return {r["record_id"]: {"status": r["status"], "reason": r["reason"], "batch_id": r["batch_id"]} for r in rows}
