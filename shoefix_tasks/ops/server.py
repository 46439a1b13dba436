"""`shoefix serve`: the champion behind an OpenAI-compatible HTTP API, apart from Airflow.

  POST /v1/chat/completions   {"model": "shoefix-expert" (or omitted), "messages": [...], "max_tokens": N,
                              "stream": false|true}; the question is the last user message (the model is
                              trained on single questions, so earlier turns are not shown to it)
  GET  /v1/models             the one model, with the version that answers
  GET  /healthz               the version served, the alias, a failed load, the queue

Decoding is fixed (greedy, as the gate evaluated it): temperature, top_p and the like are accepted
and ignored. Every answer passes the safety net: a whole answer through `check_answer`, a streamed
one sentence by sentence through `checked_stream`, so streaming never shows a forbidden claim.
Streaming uses server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

It listens on localhost by default and has no auth of its own: whatever may reach it may ask.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from shoefix_tasks.config import REGISTERED_MODEL, ServeConfig, Settings
from shoefix_tasks.ops.answerer import Answerer, Busy, Job, NotServing

log = logging.getLogger(__name__)
MAX_QUESTION_CHARS = 2000


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # sampling knobs: decoding is fixed, see the module doc
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for the same
    stream: bool = False


def error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status, headers=headers)


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def build_app(settings: Settings, cfg: ServeConfig, answerer: Answerer | None = None) -> FastAPI:
    answerer = answerer or Answerer(settings, cfg)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        answerer.start()
        try:
            yield
        finally:
            await asyncio.to_thread(answerer.stop)

    app = FastAPI(title="ShoeFix", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.answerer = answerer

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request")

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        health = answerer.health()
        return JSONResponse(health, 200 if health["serving"] else 503)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        info = answerer.info if answerer.engine is not None else {}
        return {"object": "list", "data": [{"id": REGISTERED_MODEL, "object": "model", "owned_by": "shoefix",
                                            "created": 0, "version": info.get("version"),
                                            "engine": info.get("engine")}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        if req.model not in (None, "", REGISTERED_MODEL):
            return error(404, f"model {req.model!r} does not exist; this server serves {REGISTERED_MODEL}",
                         "model_not_found")
        question = next((m.text() for m in reversed(req.messages) if m.role == "user"), "").strip()
        if not question:
            return error(400, "messages: no user message with text", "invalid_request")
        if len(question) > MAX_QUESTION_CHARS:
            return error(400, f"the question is longer than {MAX_QUESTION_CHARS} characters", "invalid_request")
        # default: the length the champion was evaluated with (recorded with the version), else the config's
        max_tokens = (req.max_completion_tokens or req.max_tokens
                      or min(int(answerer.info.get("max_new_tokens") or cfg.max_tokens), cfg.max_tokens_cap))
        if max_tokens > cfg.max_tokens_cap:
            return error(400, f"max_tokens: at most {cfg.max_tokens_cap}", "invalid_request")

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        def emit(item: tuple[str, Any]) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
                job.cancelled = True

        job = Job(question, max_tokens, req.stream, emit)
        try:
            answerer.submit(job)
        except Busy as busy:
            return error(503, str(busy), "queue_full", {"Retry-After": str(busy.retry_after_s)})
        except NotServing as err:
            return error(503, str(err), "not_serving", {"Retry-After": str(max(1, round(cfg.poll_s)))})

        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_stream(job, events, ident, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        parts: list[str] = []
        while True:
            kind, value = await events.get()
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                return error(500, value, "answer_failed")
            else:
                return JSONResponse({
                    "id": ident, "object": "chat.completion", "created": created, "model": REGISTERED_MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                 "finish_reason": "stop"}],
                    "shoefix": value})

    return app


async def _stream(job: Job, events: asyncio.Queue, ident: str, created: int) -> AsyncIterator[bytes]:
    """OpenAI's chunks: the role first, then the text as it passes the safety net, then an empty delta
    with finish_reason (plus ShoeFix's own `shoefix` field: version, seconds), then [DONE]."""
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": REGISTERED_MODEL,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "error":
                yield sse({"error": {"message": value, "type": "server_error", "code": "answer_failed"}})
                break
            else:
                yield chunk({}, "stop", shoefix=value)
                break
        yield sse("[DONE]")
    finally:  # the reader left (or we are done): the worker stops generating at its next piece
        job.cancelled = True


def serve(settings: Settings, cfg: ServeConfig) -> None:
    import uvicorn

    log.info("ShoeFix server on http://%s:%s (champion polled every %s s, queue %s)", cfg.host, cfg.port,
             cfg.poll_s, cfg.queue_size)
    uvicorn.run(build_app(settings, cfg), host=cfg.host, port=cfg.port, workers=1, log_level="info",
                timeout_graceful_shutdown=10)
