"""What `shoefix serve` answers with: the champion's engine, swapped when the alias moves, and one
worker thread that answers queued questions one at a time.

Why one at a time: the engine holds one model on a 2-core machine, and two concurrent answers only
halve each other's speed while doubling the first token's wait. Questions wait in a bounded queue
instead; a full queue refuses at once (the server answers 503 with Retry-After) rather than let
waits grow without bound.

Why load before swap: a new champion is loaded (downloaded, its served artifact verified against
its recorded hash) while the old one keeps answering; only a loaded engine replaces it, between two
answers. If the new one fails to load (a tampered artifact, a store that is down), the old one
keeps serving and the failure is kept for /healthz and logged; the failed version is tried again
with a growing pause, so a transient fault heals and a tampered artifact does not cost a download
every poll.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shoefix_tasks.config import REGISTERED_MODEL, ServeConfig, Settings
from shoefix_tasks.registry import answer_log

log = logging.getLogger(__name__)
Loader = Callable[[Settings], tuple[Any, dict]]  # -> (Engine, info: version, run_id, engine, artifact_sha256)


class Busy(Exception):
    """The queue is full; `retry_after_s` is the server's estimate of when a place frees up."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the answer queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class NotServing(Exception):
    """No champion is loaded (none registered yet, or the only one failed to load)."""


@dataclass
class Job:
    """One question. `emit` is called from the worker thread with ("text", str), ("done", dict) or
    ("error", str), always ending with "done" or "error"; `cancelled` stops a stream whose reader left."""

    question: str
    max_tokens: int
    stream: bool
    emit: Callable[[tuple[str, Any]], None]
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)


def champion_version(settings: Settings) -> int | None:
    """The registry version holding `champion` now, None if none; raises if the registry is unreachable."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    try:
        return int(mlflow.MlflowClient().get_model_version_by_alias(REGISTERED_MODEL, "champion").version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        if err.error_code == "PERMISSION_DENIED":
            # MLflow's basic-auth answers 403 for a registered model that does not exist yet (the
            # pipeline's user creates it, and owns it, at its first registration)
            log.info("alias champion not readable (403): no %s registered yet, or %s may not read it",
                     REGISTERED_MODEL, os.environ.get("MLFLOW_TRACKING_USERNAME", "this user"))
            return None
        raise


def open_served_champion(settings: Settings) -> tuple[Any, dict]:
    from shoefix_tasks.registry.served import open_champion

    return open_champion(settings, alias="champion")


class Answerer:
    def __init__(self, settings: Settings, cfg: ServeConfig, loader: Loader = open_served_champion,
                 version_of: Callable[[Settings], int | None] = champion_version):
        self.settings, self.cfg, self.loader, self.version_of = settings, cfg, loader, version_of
        self.engine: Any = None
        self.info: dict[str, Any] = {}
        self.alias_version: int | None = None
        self.load_error: dict[str, Any] | None = None
        self.registry_error: str | None = None
        self.answer_lock = threading.Lock()  # held while answering and while swapping engines
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=cfg.queue_size)
        self.mean_s = 5.0  # running mean seconds per answer, for Retry-After
        self._retry_at = 0.0
        self._failures = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- the champion ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """One poll: load and swap in the champion if the alias moved (or the last load failed and
        its pause is over)."""
        try:
            want = self.version_of(self.settings)
            self.registry_error = None
        except Exception as err:  # noqa: BLE001 - keep serving what we have; report it
            self.registry_error = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            log.warning("could not read alias champion: %s", self.registry_error)
            return
        self.alias_version = want
        if want is None or want == self.info.get("version"):
            return
        if self.load_error and self.load_error["version"] == want and time.monotonic() < self._retry_at:
            return
        log.info("loading %s version %s (alias champion)", REGISTERED_MODEL, want)
        started = time.perf_counter()
        try:
            engine, info = self.loader(self.settings)
        except Exception as err:  # noqa: BLE001 - a bad champion must not stop the server
            self._failures = self._failures + 1 if self.load_error and self.load_error["version"] == want else 1
            pause = min(self.cfg.poll_s * 2 ** self._failures, 600.0)
            self._retry_at = time.monotonic() + pause
            message = (str(err).strip().splitlines() or [type(err).__name__])[0][:500]
            self.load_error = {"version": want, "error": f"{type(err).__name__}: {message}",
                               "at": datetime.now(UTC).isoformat(timespec="seconds"), "retry_in_s": round(pause)}
            log.error("champion v%s failed to load; still serving %s: %s", want,
                      f"v{self.info['version']}" if self.engine else "nothing", self.load_error["error"])
            return
        info = {**info, "version": int(info["version"]), "loaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "load_s": round(time.perf_counter() - started, 2)}
        with self.answer_lock:  # between two answers
            old, self.engine, self.info = self.engine, engine, info
        self.load_error, self._failures = None, 0
        log.info("now serving v%s (%s engine), loaded in %.1f s", info["version"], info.get("engine"), info["load_s"])
        if old is not None:
            old.close()

    def health(self) -> dict[str, Any]:
        serving = {k: self.info.get(k) for k in ("version", "run_id", "engine", "artifact_sha256", "loaded_at",
                                                  "load_s")} if self.engine is not None else None
        if serving is None:
            nothing_yet = self.alias_version is None and not self.load_error and not self.registry_error
            status = "no_model" if nothing_yet else "not_serving"  # no champion, or one we cannot load or see
        else:
            status = "degraded" if self.load_error or self.registry_error else "ok"
        return {"status": status, "serving": serving, "champion_alias": self.alias_version,
                "load_error": self.load_error, "registry_error": self.registry_error,
                "queue": {"waiting": self.jobs.qsize(), "size": self.cfg.queue_size}}

    # --- the queue ------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if self.engine is None:
            raise NotServing(self.load_error["error"] if self.load_error else
                             "no champion to serve yet: no registry version holds alias `champion`")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            # the whole queue plus the answer in progress must pass before a new place is sure
            raise Busy(max(1, round((self.cfg.queue_size + 1) * self.mean_s))) from None

    def _answer(self, job: Job) -> None:
        from shoefix_tasks.registry.safety import check_answer, checked_stream

        s = self.settings
        with self.answer_lock:
            engine, info = self.engine, self.info
            label = f"v{info['version']}"
            started = time.perf_counter()
            shown: list[str] = []  # what the user saw, after the safety net: the answer the trace keeps
            if job.stream:
                pieces = checked_stream(job.question, engine.stream(job.question, job.max_tokens), s.data_dir,
                                        s.home, model=label)
                with contextlib.closing(pieces):
                    for text in pieces:
                        if job.cancelled:
                            break
                        shown.append(text)
                        job.emit(("text", text))
            else:
                raw = engine.answer(job.question, job.max_tokens)
                shown.append(check_answer(job.question, raw, s.data_dir, s.home, model=label).answer)
                job.emit(("text", shown[0]))
            seconds = time.perf_counter() - started
            text = "".join(shown)
            tokens = engine.count_tokens(text) if hasattr(engine, "count_tokens") else len(text.split())
        self.mean_s = 0.8 * self.mean_s + 0.2 * seconds
        # spooled locally (no network): the trace goes to MLflow from the flush thread
        answer_id = answer_log.record_answer(s, job.question, text, model_version=str(info["version"]),
                                             latency_s=seconds, tokens=tokens, engine=str(info.get("engine") or ""))
        job.emit(("done", {"version": info["version"], "engine": info.get("engine"), "seconds": round(seconds, 2),
                           "waited_s": round(started - job.queued_at, 2), "answer_id": answer_id}))

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if not job.cancelled:
                    self._answer(job)
                else:
                    job.emit(("error", "cancelled"))
            except Exception as err:  # noqa: BLE001 - one failed answer must not stop the worker
                log.exception("answering failed")
                job.emit(("error", f"the champion could not answer: {type(err).__name__}"))

    def _poll(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the poller must outlive anything a refresh raises
                log.exception("champion refresh failed")
            if self._stop.wait(self.cfg.poll_s):
                return

    def _flush_traces(self) -> None:
        """Send spooled answers to MLflow as traces, and attach corrections waiting for them; a store that
        is down only delays this (answer_log keeps them), it never touches an answer."""
        from shoefix_tasks.registry import feedback

        while not self._stop.wait(self.cfg.trace_flush_s):
            try:
                if answer_log.stats(self.settings)["pending"]:
                    answer_log.flush(self.settings)
                    feedback.attach_pending(self.settings)
            except Exception:  # noqa: BLE001 - the flusher must outlive anything a flush raises
                log.exception("trace flush failed")

    def start(self) -> None:
        for name, target in (("shoefix-answer", self._work), ("shoefix-reload", self._poll),
                             ("shoefix-traces", self._flush_traces)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:  # what is still spooled stays on disk for the next start or weekly run
            thread.join(timeout=30)
        with self.answer_lock:
            if self.engine is not None:
                self.engine.close()
                self.engine = None
