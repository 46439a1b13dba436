"""Optional LLM judge: any OpenAI-compatible chat endpoint scores the seed's four criteria 1-10.

Configured as an Airflow connection (`shoefix_judge`: host = base URL, password = API key,
extra = {"model": ..., "repeats": 3}); the DAG resolves it and passes a `JudgeConfig` here.
Temperature is fixed at 0 and each answer is judged `repeats` times; the mean is the score and the
variance is reported. Any failure raises `JudgeError`: the caller fails the gate closed.
"""

from __future__ import annotations

import json
import re
import statistics
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

CRITERIA = ("completeness", "key_data_accuracy", "semantic_consistency", "readability")
PROMPT = """You grade answers of a shoe mold-prevention expert assistant against a reference answer.
Score each criterion from 1 (worst) to 10 (best):
- completeness: covers the reference's key points
- key_data_accuracy: numbers, units and named agents/materials stated correctly, no wrong numbers
- semantic_consistency: means the same as the reference and does not contradict itself
- readability: well-formed, complete sentences, no repetition, sensible length
Reply with JSON only: {"completeness": n, "key_data_accuracy": n, "semantic_consistency": n, "readability": n}

Question: {question}
Reference answer: {reference}
Answer to grade: {answer}"""


class JudgeError(RuntimeError):
    """The configured judge could not score (HTTP error, timeout, unparseable reply)."""


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    api_key: str = ""
    repeats: int = 3
    timeout_s: float = 60.0

    def __repr__(self) -> str:  # never print the key
        return f"JudgeConfig(base_url={self.base_url!r}, model={self.model!r}, repeats={self.repeats})"


def _ask(cfg: JudgeConfig, prompt: str) -> dict[str, float]:
    body = json.dumps({"model": cfg.model, "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
    req = urllib.request.Request(cfg.base_url.rstrip("/") + "/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {})})
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
            reply = json.loads(resp.read())
        text = reply["choices"][0]["message"]["content"]
        match = re.search(r"\{.*\}", text, re.S)
        scores = json.loads(match.group(0) if match else text)
        out = {c: float(scores[c]) for c in CRITERIA}
    except (urllib.error.URLError, TimeoutError, KeyError, IndexError, TypeError, ValueError) as err:
        raise JudgeError(f"judge at {cfg.base_url} failed: {type(err).__name__}: {err}") from err
    if not all(1 <= v <= 10 for v in out.values()):
        raise JudgeError(f"judge returned scores outside 1-10: {out}")
    return out


def judge_answer(cfg: JudgeConfig, question: str, reference: str, answer: str) -> dict[str, Any]:
    """Mean and variance of each criterion over `cfg.repeats` judgements."""
    prompt = PROMPT.replace("{question}", question).replace("{reference}", reference).replace("{answer}", answer)
    runs = [_ask(cfg, prompt) for _ in range(cfg.repeats)]
    out: dict[str, Any] = {}
    for c in CRITERIA:
        values = [r[c] for r in runs]
        out[c] = round(statistics.fmean(values), 3)
        out[f"{c}_var"] = round(statistics.pvariance(values), 4)
    return out


def judge_side(cfg: JudgeConfig, items: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    """Judge every answer of one model; summary means and the mean per-answer variance."""
    per = [judge_answer(cfg, it["question"], it["answer"], a) for it, a in zip(items, answers, strict=True)]
    summary = {f"judge_{c}": round(statistics.fmean(p[c] for p in per), 3) for c in CRITERIA}
    summary["judge_mean_variance"] = round(statistics.fmean(p[f"{c}_var"] for p in per for c in CRITERIA), 4)
    return {"per_question": per, "summary": summary}
