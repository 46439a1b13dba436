"""Inference: load base (+ verified adapter, merged) and answer questions, batched.

Merging the LoRA weights into the base (`merge_and_unload`) makes the served model exactly the
base architecture again: no adapter matmuls per token, so latency is the base's.

On a GPU, single answers (serving, the latency measurement) use a static KV cache of
`STATIC_CACHE_LEN` tokens: transformers then compiles the decode step (CUDA graphs) instead of
driving one eager step per token from Python (figures: docs/benchmarks.md). The first call compiles;
one cache size for every prompt means no recompiles. Batched quality runs keep the dynamic cache:
each new batch size would compile again.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Settings
from shoefix_tasks.model.prompting import prompt_messages

log = logging.getLogger(__name__)
STATIC_CACHE_LEN = 1024  # tokens of prompt + answer a static KV cache holds


@dataclass
class Answerer:
    model: Any
    tokenizer: Any
    label: str
    manifest: dict[str, Any] | None = None
    static_cache_len: int = 0  # > 0: single answers that fit use a static KV cache of this many tokens


def load_answerer(base_model: str, adapter_dir: Path | None, settings: Settings, dtype: str = "float32",
                  label: str = "base") -> Answerer:
    """Base model, plus the adapter merged in when given. The adapter's manifest and its recorded
    base identity are checked first: a tampered adapter or one from another base never loads."""
    from shoefix_tasks.model.adapter import verify_adapter
    from shoefix_tasks.model.base import base_identity, check_compatible, load_base

    manifest = None
    if adapter_dir is not None:
        manifest = verify_adapter(adapter_dir)
        check_compatible(manifest["base"], base_identity(base_model, settings), f"adapter {label}")
    model, tokenizer = load_base(base_model, settings, dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
    import torch

    cuda = torch.cuda.is_available()
    if cuda:  # evaluate and serve on the GPU when the worker has one
        model.to("cuda")
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    return Answerer(model, tokenizer, label, manifest, static_cache_len=STATIC_CACHE_LEN if cuda else 0)


def _encode(ans: Answerer, questions: list[str]):
    texts = [ans.tokenizer.apply_chat_template(prompt_messages(q), tokenize=False, add_generation_prompt=True)
             for q in questions]
    enc = ans.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.to(ans.model.device)


def _cache_kwargs(ans: Answerer, enc, max_new_tokens: int) -> dict[str, Any]:
    """generate() kwargs choosing the KV cache: static for one answer that fits, else dynamic."""
    rows, prompt_len = enc["input_ids"].shape
    if ans.static_cache_len and rows == 1 and prompt_len + max_new_tokens <= ans.static_cache_len:
        return {"cache_implementation": "static", "max_cache_len": ans.static_cache_len}
    return {"cache_implementation": "dynamic"}


def _sync(ans: Answerer) -> None:
    import torch

    if ans.model.device.type == "cuda":  # GPU work is asynchronous: time it to the end
        torch.cuda.synchronize()


def speed_profile(ans: Answerer, max_new_tokens: int, repetition_penalty: float) -> dict[str, Any]:
    """What can make one model answer faster than another: architecture, dtype, quantization, engine
    and decoding. Two models with the same profile differ in speed only by noise (a merged LoRA adapter
    leaves the base's shapes unchanged), so the gate compares latency only when profiles differ."""
    cfg = ans.model.config
    quant = getattr(cfg, "quantization_config", None)
    return {
        "architecture": f"{cfg.model_type}/h{getattr(cfg, 'hidden_size', '?')}/l{getattr(cfg, 'num_hidden_layers', '?')}"
                        f"/v{getattr(cfg, 'vocab_size', '?')}",
        "dtype": str(next(ans.model.parameters()).dtype).removeprefix("torch."),
        "quantization": (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None))
                        or "none",
        "engine": "transformers",
        "device": ans.model.device.type,
        "decoding": {"max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty, "greedy": True},
    }


def tokens_needed(ans: Answerer, texts: list[str], margin: float) -> int:
    """New tokens that cover the longest of `texts` (reference answers) in this model's tokenizer, with
    a margin, so that no answer is scored after being cut short."""
    import math

    longest = max((len(ans.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts), default=0)
    return math.ceil(longest * margin)


def generate(ans: Answerer, questions: list[str], max_new_tokens: int, batch_size: int,
             repetition_penalty: float = 1.0) -> list[dict[str, Any]]:
    """Greedy answers for all questions; batches are formed from similar prompt lengths. Progress is
    logged after every batch (answers, rate, time left): on a CPU an evaluation takes minutes."""
    import torch

    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))
    out: list[dict[str, Any] | None] = [None] * len(questions)
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = _encode(ans, [questions[i] for i in idx])
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = ans.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     repetition_penalty=repetition_penalty,
                                     pad_token_id=ans.tokenizer.pad_token_id,
                                     **_cache_kwargs(ans, enc, max_new_tokens))
        _sync(ans)
        elapsed = time.perf_counter() - t0
        new = gen[:, enc["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            ids = new[row]
            n_tokens = int((ids != ans.tokenizer.pad_token_id).sum())
            out[i] = {"answer": ans.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                      "new_tokens": n_tokens, "batch_seconds": elapsed / len(idx)}
        done, spent = min(len(order), start + batch_size), time.perf_counter() - started
        log.info("%s: %d/%d answered, %.2f answers/s, about %.0f s left", ans.label, done, len(order),
                 done / spent, (len(order) - done) * spent / done)
    return out  # type: ignore[return-value]


def _timed_answer(ans: Answerer, question: str, max_new_tokens: int, repetition_penalty: float) -> float:
    import torch

    enc = _encode(ans, [question])
    _sync(ans)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ans.model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           do_sample=False, repetition_penalty=repetition_penalty,
                           pad_token_id=ans.tokenizer.pad_token_id, **_cache_kwargs(ans, enc, max_new_tokens))
    _sync(ans)
    return time.perf_counter() - t0


def latency_stats(times: list[float], max_new_tokens: int) -> dict[str, Any]:
    """Quantiles of per-answer wall times of `max_new_tokens` tokens each (also used by benchmarks)."""
    ordered = sorted(times)
    if not ordered:
        return {"p50_s": 0.0, "p95_s": 0.0, "p25_s": 0.0, "p75_s": 0.0, "tokens_per_s": 0.0, "n": 0, "times_s": []}

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    p50 = statistics.median(ordered)
    return {"p50_s": round(p50, 4), "p95_s": round(q(0.95), 4), "p25_s": round(q(0.25), 4), "p75_s": round(q(0.75), 4),
            "tokens_per_s": round(max_new_tokens / p50, 2), "n": len(ordered),
            "times_s": [round(t, 4) for t in times]}


def _timed(model, question: str, max_new_tokens: int, repetition_penalty: float) -> float:
    """One timed answer from an Answerer, or from an engine (model/engines.py: its own penalty)."""
    if isinstance(model, Answerer):
        return _timed_answer(model, question, max_new_tokens, repetition_penalty)
    return model.timed_answer(question, max_new_tokens)


def measure_latency_interleaved(answerers: list, questions: list[str], max_new_tokens: int,
                                repetition_penalty: float = 1.0, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Batch-1 wall time per answer for several models (Answerers or engines, as evaluation and
    serving open them), interleaved: question i is answered by every
    model in turn, the order reversed on every other question (ABBA), so machine load and warm caches
    fall on all of them alike. Generation runs to exactly `max_new_tokens` (EOS ignored): a model is
    never "faster" merely because it answers shorter. `warmup` untimed answers per model first
    (static-cache compilation on a GPU, allocator and caches anywhere). Keyed by each model's label."""
    if not questions:
        return {a.label: latency_stats([], max_new_tokens) for a in answerers}
    for ans in answerers:
        for q in questions[:warmup]:
            _timed(ans, q, max_new_tokens, repetition_penalty)
    times: dict[str, list[float]] = {a.label: [] for a in answerers}
    total, started = len(questions) * len(answerers), time.perf_counter()
    for i, q in enumerate(questions):
        for ans in (answerers if i % 2 == 0 else answerers[::-1]):
            times[ans.label].append(_timed(ans, q, max_new_tokens, repetition_penalty))
        done, spent = (i + 1) * len(answerers), time.perf_counter() - started
        if (i + 1) % 4 == 0 or i + 1 == len(questions):  # these are the slowest answers: say where it is
            log.info("latency: %d/%d timed answers of %d tokens (%s), about %.0f s left", done, total,
                     max_new_tokens, " / ".join(a.label for a in answerers), (total - done) * spent / done)
    return {label: latency_stats(t, max_new_tokens) for label, t in times.items()}


def measure_latency(ans: Answerer, questions: list[str], max_new_tokens: int,
                    repetition_penalty: float = 1.0) -> dict[str, float]:
    """One model's batch-1 latency (benchmarks); see measure_latency_interleaved."""
    stats = measure_latency_interleaved([ans], questions, max_new_tokens, repetition_penalty)[ans.label]
    return {k: v for k, v in stats.items() if k in ("p50_s", "p95_s", "tokens_per_s", "n")}
