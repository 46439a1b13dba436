"""Every served answer becomes an MLflow trace; tracing never blocks or fails an answer.

An answer is first appended to a local spool (`<home>/answers/spool.jsonl`, one short locked append:
no network on the answer's path) and sent to MLflow later by `flush`, which the server runs in the
background and `shoefix answers flush` runs by hand. If MLflow is down, answers wait in the spool and
go out with the next flush that reaches it. The spool is bounded (`AnswerLogConfig.max_pending`):
nothing is lost up to the bound, and every answer refused beyond it is counted (`state.json`,
`dropped`), never silently.

What is kept: the question and answer with PII and secrets replaced (`intake.screening.redact_pii`,
the same patterns intake quarantines on), the served model version, engine, latency and token count.
Each answer gets an `answer_id` at once (the client shows it, and a reviewer's correction names it);
the trace carries it as the tag `shoefix.answer_id`, and `index.jsonl` maps it to the trace id once
sent. Experts' corrections (registry.feedback) and the coverage list (ops.asked) read the log here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Settings
from shoefix_tasks.intake.screening import redact_pii

log = logging.getLogger(__name__)
TRACE_NAME = "shoefix_answer"


@dataclass(frozen=True)
class AnswerLogConfig:
    """max_pending: answers waiting to be sent, at most (a day of answers at a few a minute);
    experiment: where the traces go, apart from training runs."""

    max_pending: int = 10_000
    experiment: str = "shoefix-answers"

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError("answer log: max_pending must be at least 1")

    @classmethod
    def from_env(cls) -> AnswerLogConfig:
        return cls(int(os.environ.get("SHOEFIX_ANSWER_LOG_MAX_PENDING", cls.max_pending)),
                   os.environ.get("SHOEFIX_ANSWER_LOG_EXPERIMENT", cls.experiment))


def log_dir(settings: Settings) -> Path:
    return settings.home / "answers"


@contextmanager
def _locked(folder: Path, name: str = ".lock") -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _state(folder: Path) -> dict[str, int]:
    try:
        return {"pending": 0, "dropped": 0, "sent": 0, **json.loads((folder / "state.json").read_text())}
    except FileNotFoundError:
        return {"pending": 0, "dropped": 0, "sent": 0}


def _save_state(folder: Path, state: dict[str, int]) -> None:
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / "state.json")


def record_answer(settings: Settings, question: str, answer: str, *, model_version: str, latency_s: float,
                  tokens: int, engine: str = "", cfg: AnswerLogConfig | None = None) -> str | None:
    """Spool one served answer; its answer_id, or None if it could not be kept (logged, never raised:
    the answer itself has already been given)."""
    cfg = cfg or AnswerLogConfig.from_env()
    folder = log_dir(settings)
    try:
        q, pii_q = redact_pii(question)
        a, pii_a = redact_pii(answer)
        entry = {"answer_id": uuid.uuid4().hex, "at": time.time(), "question": q, "answer": a,
                 "redacted": sorted(set(pii_q + pii_a)), "model_version": str(model_version),
                 "engine": engine, "latency_s": round(float(latency_s), 4), "tokens": int(tokens)}
        with _locked(folder):
            state = _state(folder)
            if state["pending"] >= cfg.max_pending:
                state["dropped"] += 1
                _save_state(folder, state)
                log.warning("answer log full (%d waiting for MLflow): answer not traced, %d dropped so far",
                            state["pending"], state["dropped"])
                return None
            with open(folder / "spool.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            state["pending"] += 1
            _save_state(folder, state)
        return entry["answer_id"]
    except Exception:  # noqa: BLE001 - a full disk must not turn a served answer into an error
        log.exception("could not spool the answer for tracing")
        return None


def _send(client: Any, experiment_id: str, entry: dict[str, Any]) -> str:
    start = int(entry["at"] * 1e9)
    span = client.start_trace(TRACE_NAME, span_type="LLM", inputs={"question": entry["question"]},
                              attributes={"model_version": entry["model_version"], "engine": entry["engine"]},
                              tags={"shoefix.answer_id": entry["answer_id"],
                                    "shoefix.model_version": entry["model_version"]},
                              experiment_id=experiment_id, start_time_ns=start)
    client.end_trace(span.trace_id, outputs={"answer": entry["answer"]},
                     attributes={"latency_s": entry["latency_s"], "tokens": entry["tokens"],
                                 "redacted": ",".join(entry["redacted"])},
                     end_time_ns=start + int(entry["latency_s"] * 1e9))
    return span.trace_id


def flush(settings: Settings, cfg: AnswerLogConfig | None = None) -> dict[str, Any]:
    """Send the spooled answers to MLflow, oldest first; stop at the first failure and keep the rest.

    The spool is renamed to a batch file under the lock (answers keep being spooled meanwhile) and
    sent outside it; a batch left by a failed flush is sent first next time."""
    cfg = cfg or AnswerLogConfig.from_env()
    folder = log_dir(settings)
    with _locked(folder, ".flush.lock"):  # one flush at a time (the server's thread, a CLI call)
        return _flush(settings, cfg, folder)


def _flush(settings: Settings, cfg: AnswerLogConfig, folder: Path) -> dict[str, Any]:
    import mlflow

    from shoefix_tasks.store import tracking

    with _locked(folder):
        if (folder / "spool.jsonl").exists():
            (folder / "spool.jsonl").replace(folder / f"batch-{time.time_ns()}.jsonl")
    sent, error = 0, None
    for batch in sorted(folder.glob("batch-*.jsonl")):
        entries = [json.loads(line) for line in batch.read_text(encoding="utf-8").splitlines() if line.strip()]
        done = 0
        try:
            tracking.configure(settings)
            client = mlflow.MlflowClient()
            exp = client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
            trace_ids = [_send(client, exp_id, entry) for entry in entries]
            # MLflow exports traces in the background and only logs a failed export: wait for the export,
            # then count an answer as sent only once the server returns its trace
            mlflow.flush_trace_async_logging()
            with open(folder / "index.jsonl", "a", encoding="utf-8") as index:
                for entry, trace_id in zip(entries, trace_ids, strict=True):
                    client.get_trace(trace_id)
                    index.write(json.dumps({**entry, "trace_id": trace_id}, ensure_ascii=False) + "\n")
                    index.flush()
                    done += 1
        except Exception as err:  # noqa: BLE001 - MLflow down or refusing: keep the rest for later
            error = f"{type(err).__name__}: {err}"[:300]
            log.warning("answer traces not sent (%d kept for later): %s", len(entries) - done, error)
        rest = entries[done:]
        with _locked(folder):
            state = _state(folder)
            state["pending"] = max(0, state["pending"] - done)
            state["sent"] += done
            _save_state(folder, state)
        sent += done
        if rest:
            tmp = batch.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in rest), encoding="utf-8")
            tmp.replace(batch)
            break
        batch.unlink()
    return {"sent": sent, "error": error, **{k: v for k, v in stats(settings).items() if k != "sent"}}


def stats(settings: Settings) -> dict[str, int]:
    folder = log_dir(settings)
    with _locked(folder):
        return _state(folder)


def iter_answers(settings: Settings) -> Iterator[dict[str, Any]]:
    """Every logged answer, sent (with its trace_id) or still waiting (without)."""
    folder = log_dir(settings)
    paths = [folder / "index.jsonl", *sorted(folder.glob("batch-*.jsonl")), folder / "spool.jsonl"]
    for path in paths:
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    yield json.loads(line)


def find_answer(settings: Settings, answer_id: str) -> dict[str, Any] | None:
    found = None
    for entry in iter_answers(settings):  # the index line (with trace_id) comes first and wins
        if entry["answer_id"] == answer_id and found is None:
            found = entry
    return found


def uncovered_questions(settings: Settings, top: int = 30) -> tuple[int, list[dict[str, Any]]]:
    """(answers logged, the most-asked of their questions that the taught corpus does not cover): the one
    computation behind the ShoeFix page's coverage card and the weekly use summary (intake.asked)."""
    from shoefix_tasks.intake.asked import taught_corpus, uncovered

    questions = [a["question"] for a in iter_answers(settings)]
    return len(questions), uncovered(questions, taught_corpus(settings), top=top)
