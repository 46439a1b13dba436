"""Asking `shoefix serve` over HTTP: what `shoefix ask` and the ShoeFix page in Airflow use.

Standard library only (urllib), so the Airflow api-server needs nothing new to forward a question,
and nothing here loads a model. Failures become two exceptions a caller can word for a person:
`ServerDown` (nothing answers at the URL: start `shoefix serve`) and `ServerError` (it answered
with an error; `retry_after_s` set when it was busy).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from shoefix_tasks.config import REGISTERED_MODEL


class ServerDown(ConnectionError):
    def __init__(self, url: str, why: str):
        super().__init__(f"no ShoeFix answer server at {url} ({why}); start it with `shoefix serve` "
                         "(or set SHOEFIX_SERVING_URL)")
        self.url = url


class ServerError(RuntimeError):
    def __init__(self, status: int, message: str, code: str = "", retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after_s = status, code, retry_after_s


def _request(url: str, question: str, max_tokens: int | None, stream: bool, timeout: float):
    body: dict[str, Any] = {"model": REGISTERED_MODEL, "messages": [{"role": "user", "content": question}],
                            "stream": stream}
    if max_tokens:
        body["max_tokens"] = max_tokens
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - the configured server's URL
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read() or b"{}").get("error", {})
        except ValueError:
            detail = {}
        retry = err.headers.get("Retry-After")
        raise ServerError(err.code, detail.get("message") or f"HTTP {err.code}", detail.get("code", ""),
                          int(retry) if retry and retry.isdigit() else None) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        raise ServerDown(url, str(getattr(err, "reason", err))) from None


def answer(url: str, question: str, max_tokens: int | None = None, timeout: float = 600) -> dict[str, Any]:
    """The whole answer at once: {"answer", "version", "seconds", ...}."""
    with _request(url, question, max_tokens, False, timeout) as resp:
        reply = json.loads(resp.read())
    return {"answer": reply["choices"][0]["message"]["content"], **reply.get("shoefix", {})}


def stream(url: str, question: str, max_tokens: int | None = None, timeout: float = 600) -> Iterator[dict[str, Any]]:
    """The answer as it is written: {"text": piece} ..., then {"done": {"version", "seconds", ...}}.
    Raises ServerError if the server reports a failure mid-answer."""
    with _request(url, question, max_tokens, True, timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise ServerError(500, event["error"].get("message", "the server failed"), event["error"].get("code", ""))
            choice = event["choices"][0]
            if choice["delta"].get("content"):
                yield {"text": choice["delta"]["content"]}
            if choice.get("finish_reason"):
                yield {"done": event.get("shoefix", {})}
