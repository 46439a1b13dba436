"""One interface for answering with a model, whatever runs it: llama.cpp or transformers.

Serving (`shoefix serve`, `shoefix ask`, the MLflow pyfunc) and evaluation open the same engine with
the same settings, so the gate's latency bound and scorecard are about what production serves.

- llama.cpp for bases that ship as a GGUF (the embedded default): the shipped GGUF with the LoRA merged
  in (FORM_MERGED, model/gguf_merge.py, with the LoRA in llama.cpp's terms from model/gguf_adapter.py). On this
  2-core CPU it answers several times faster than transformers fp32, and faster than the same LoRA
  applied by llama.cpp at run time (FORM_LORA: how versions registered before the merge still open).
- transformers for bases that are Hugging Face folders (tiny test models, GPU bases), through
  model/generation.py as before.

Decoding is the product's on both: greedy, the chat template of the base, the same repetition penalty
applied the way transformers applies it (to every token of the prompt and the answer so far; the
llama-cpp-python sampler would penalise only the last 64 generated tokens), so both engines pick the
same tokens up to float rounding. llama.cpp is therefore driven token by token here (eval + logits +
argmax), not through its sampler. A llama.cpp context is not thread-safe: calls are serialised.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from shoefix_tasks.config import Settings
from shoefix_tasks.model.prompting import prompt_messages

log = logging.getLogger(__name__)
LLAMA_CTX = 2048  # tokens of prompt + answer one llama.cpp context holds (evaluation asks for ~400)
# the two served forms of an adapter for llama.cpp (registry/served.py records which one a version has)
FORM_LORA, FORM_MERGED = "gguf-lora", "gguf-merged-q8_0"


class Engine(Protocol):
    name: str  # "llama.cpp" or "transformers"
    label: str

    def stream(self, question: str, max_new_tokens: int) -> Iterator[str]: ...
    def answer(self, question: str, max_new_tokens: int) -> str: ...
    def answer_many(self, questions: list[str], max_new_tokens: int) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


def shipped_gguf(base_model: str) -> Path | None:
    """The GGUF a base ships as, or None (a Hugging Face folder or hub id)."""
    from shoefix_tasks.model.base import SMOLLM2, smollm2_gguf_path

    return smollm2_gguf_path() if base_model == SMOLLM2 else None


def choose_engine(base_model: str, engine: str = "auto") -> str:
    if engine not in ("auto", "llama.cpp", "transformers"):
        raise ValueError(f"unknown inference engine {engine!r} (auto, llama.cpp, transformers)")
    if engine != "auto":
        return engine
    return "llama.cpp" if shipped_gguf(base_model) is not None else "transformers"


def inference_threads() -> int:
    """SHOEFIX_INFERENCE_THREADS, else half the cores (llama-cpp-python's own default). Decode is
    memory-bound, and llama.cpp's threads spin at a barrier every layer: when other processes want the
    cores too (Airflow, MLflow, a second model) all-cores collapses (docs/benchmarks.md)."""
    return int(os.environ.get("SHOEFIX_INFERENCE_THREADS") or max(1, (os.cpu_count() or 2) // 2))


class TransformersEngine:
    """model.generation's path (base + verified adapter merged), behind the Engine interface."""

    name = "transformers"

    def __init__(self, answerer, repetition_penalty: float, batch_size: int = 8):
        self.ans, self.label, self.manifest = answerer, answerer.label, answerer.manifest
        self.repetition_penalty, self.batch_size = repetition_penalty, batch_size
        self._lock = threading.Lock()

    def stream(self, question: str, max_new_tokens: int) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        from shoefix_tasks.model.generation import _cache_kwargs, _encode

        with self._lock:
            enc = _encode(self.ans, [question])
            streamer = TextIteratorStreamer(self.ans.tokenizer, skip_prompt=True, skip_special_tokens=True)
            errors: list[BaseException] = []
            stop = threading.Event()  # the reader left (or the safety net stopped the answer)

            def stopped(input_ids, scores, **_kw):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

            def run() -> None:
                try:
                    with torch.inference_mode():
                        self.ans.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                                repetition_penalty=self.repetition_penalty, streamer=streamer,
                                                pad_token_id=self.ans.tokenizer.pad_token_id,
                                                stopping_criteria=StoppingCriteriaList([stopped]),
                                                **_cache_kwargs(self.ans, enc, max_new_tokens))
                except BaseException as err:  # surfaced in the caller's thread below
                    errors.append(err)
                    streamer.end()

            worker = threading.Thread(target=run, name="shoefix-generate", daemon=True)
            worker.start()
            try:
                yield from (piece for piece in streamer if piece)
            finally:  # also when the stream is closed early: generation stops before the lock is released,
                stop.set()  # so the next answer never runs on the model at the same time
                worker.join()
            if errors:
                raise errors[0]

    def answer(self, question: str, max_new_tokens: int) -> str:
        return self.answer_many([question], max_new_tokens)[0]["answer"]

    def answer_many(self, questions: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
        from shoefix_tasks.model.generation import generate

        with self._lock:
            return generate(self.ans, questions, max_new_tokens, self.batch_size, self.repetition_penalty)

    def timed_answer(self, question: str, max_new_tokens: int) -> float:
        """Seconds for exactly `max_new_tokens` new tokens (EOS ignored): the latency measurement."""
        from shoefix_tasks.model.generation import _timed_answer

        with self._lock:
            return _timed_answer(self.ans, question, max_new_tokens, self.repetition_penalty)

    def count_tokens(self, text: str) -> int:
        return len(self.ans.tokenizer(text, add_special_tokens=False)["input_ids"])

    def profile(self, max_new_tokens: int) -> dict[str, Any]:
        from shoefix_tasks.model.generation import speed_profile

        return speed_profile(self.ans, max_new_tokens, self.repetition_penalty)

    def close(self) -> None:
        self.ans = None


class LlamaCppEngine:
    """A GGUF model (a base, or a base with the adapter merged in; optionally + a GGUF LoRA applied at
    run time) in llama.cpp, decoded greedily token by token."""

    name = "llama.cpp"

    def __init__(self, model_gguf: Path, adapter_gguf: Path | None, repetition_penalty: float, label: str,
                 manifest: dict[str, Any] | None = None, threads: int | None = None, form: str | None = None):
        import jinja2.sandbox
        from llama_cpp import Llama

        self.label, self.manifest, self.repetition_penalty = label, manifest, repetition_penalty
        self.model_gguf, self.adapter_gguf = model_gguf, adapter_gguf
        self.form = form or (FORM_LORA if adapter_gguf else "base")
        self.threads = threads or inference_threads()
        self.llm = Llama(model_path=str(model_gguf), lora_path=str(adapter_gguf) if adapter_gguf else None,
                         n_ctx=LLAMA_CTX, n_batch=256, n_threads=self.threads, n_threads_batch=self.threads,
                         seed=0, verbose=False)
        # the base's own chat template, rendered the way transformers renders it
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(self.llm.metadata["tokenizer.chat_template"])
        self._n_vocab = self.llm.n_vocab()
        self._stop = {self.llm.token_eos()}
        self._lock = threading.Lock()
        # what every prompt starts with (the system prompt): the tokens two different questions share
        self._prefix = os.path.commonprefix([self._tokens("a"), self._tokens("b")])

    def prompt_text(self, question: str) -> str:
        return self._template.render(messages=prompt_messages(question), add_generation_prompt=True)

    def _tokens(self, question: str) -> list[int]:
        return self.llm.tokenize(self.prompt_text(question).encode(), add_bos=False, special=True)

    def _prime(self, prompt: list[int]) -> None:
        """Evaluate `prompt` as two batches, the system prompt's tokens (`_prefix`, the part every prompt
        shares) and then the question's, and keep the first batch's keys and values for the next prompt.
        Only the question's tokens are computed per answer: this is most of the time to the first token.
        Always the same two batches, cached or not, because a token's float result can depend on the size
        of the batch it is computed in: so a question gets the same answer whatever was asked before it
        (tested)."""
        import numpy as np

        n = len(self._prefix)
        if n and len(prompt) > n and prompt[:n] == self._prefix:
            cached = self.llm.n_tokens >= n and np.array_equal(self.llm.input_ids[:n], self._prefix)
            self.llm.n_tokens = n if cached else 0  # eval() drops the cache from here on
            if not cached:
                self.llm.eval(self._prefix)
            self.llm.eval(prompt[n:])
        else:
            self.llm.n_tokens = 0
            self.llm.eval(prompt)

    def _generate(self, question: str, max_new_tokens: int, forced: bool = False) -> Iterator[int]:
        """Greedy token ids; `forced` never stops at EOS (as transformers' min_new_tokens). Hold the lock."""
        import numpy as np

        prompt = self._tokens(question)
        if len(prompt) + max_new_tokens > LLAMA_CTX:
            raise ValueError(f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed the context of {LLAMA_CTX}")
        seen = np.zeros(self._n_vocab, dtype=bool)
        seen[prompt] = True
        self._prime(prompt)
        p = self.repetition_penalty
        for _ in range(max_new_tokens):
            logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self._n_vocab,)).copy()
            if p != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor
                hit = logits[seen]
                logits[seen] = np.where(hit > 0, hit / p, hit * p)
            if forced:
                logits[list(self._stop)] = -np.inf
            token = int(np.argmax(logits))
            if token in self._stop:
                return
            yield token
            seen[token] = True
            self.llm.eval([token])

    def stream(self, question: str, max_new_tokens: int) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        with self._lock:
            for token in self._generate(question, max_new_tokens):
                piece = decoder.decode(self.llm.detokenize([token], special=False))
                if piece:
                    yield piece
            tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def _complete(self, question: str, max_new_tokens: int) -> tuple[str, int]:
        with self._lock:
            ids = list(self._generate(question, max_new_tokens))
            text = self.llm.detokenize(ids, special=False).decode("utf-8", errors="replace")
        return text.strip(), len(ids)

    def answer(self, question: str, max_new_tokens: int) -> str:
        return self._complete(question, max_new_tokens)[0]

    def answer_many(self, questions: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
        """One at a time (llama-cpp-python decodes one sequence per context); on this CPU that is still
        faster than transformers' batches (docs/benchmarks.md). Same fields as generation.generate."""
        out, started = [], time.perf_counter()
        for i, q in enumerate(questions):
            t0 = time.perf_counter()
            text, n = self._complete(q, max_new_tokens)
            out.append({"answer": text, "new_tokens": n, "batch_seconds": time.perf_counter() - t0})
            if (i + 1) % 8 == 0 or i + 1 == len(questions):
                spent = time.perf_counter() - started
                log.info("%s: %d/%d answered, %.2f answers/s, about %.0f s left", self.label, i + 1,
                         len(questions), (i + 1) / spent, (len(questions) - i - 1) * spent / (i + 1))
        return out

    def timed_answer(self, question: str, max_new_tokens: int) -> float:
        with self._lock:
            t0 = time.perf_counter()
            for _ in self._generate(question, max_new_tokens, forced=True):
                pass
            return time.perf_counter() - t0

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=False))

    def profile(self, max_new_tokens: int) -> dict[str, Any]:
        """What can change speed (see generation.speed_profile): the base GGUF's type, the engine."""
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "?")
        return {"architecture": f"{arch}/h{meta.get(f'{arch}.embedding_length', '?')}"
                                f"/l{meta.get(f'{arch}.block_count', '?')}/v{self._n_vocab}",
                "dtype": f"gguf-file-type-{meta.get('general.file_type', '?')}",
                "quantization": "gguf", "engine": "llama.cpp", "device": "cpu", "threads": self.threads,
                "adapter": self.form,
                "decoding": {"max_new_tokens": max_new_tokens, "repetition_penalty": self.repetition_penalty,
                             "greedy": True}}

    def close(self) -> None:
        with self._lock:
            self.llm.close()


def answer_each(engines: list[Engine], questions: list[str], max_new_tokens: int) -> dict[str, list[dict[str, Any]]]:
    """Every engine's answers to `questions`, keyed by label. llama.cpp engines answer side by side, one
    Python thread each: llama.cpp releases the GIL while it computes and each context keeps to its own
    `threads` (half the cores by default), so two of them fill the machine without the oversubscription
    that stalls one context on all cores (inference_threads). Transformers engines answer in turn: torch
    already spreads one model over every core."""
    from concurrent.futures import ThreadPoolExecutor

    side_by_side = (len(engines) > 1 and all(isinstance(e, LlamaCppEngine) for e in engines)
                    and sum(e.threads for e in engines) <= (os.cpu_count() or 1))
    if not side_by_side:
        return {e.label: e.answer_many(questions, max_new_tokens) for e in engines}
    with ThreadPoolExecutor(len(engines), thread_name_prefix="shoefix-answer") as pool:
        futures = {e.label: pool.submit(e.answer_many, questions, max_new_tokens) for e in engines}
        return {label: f.result() for label, f in futures.items()}


def _cache_key(adapter_dir: Path, base_gguf: Path) -> str:
    """What a file derived from this verified adapter and this base GGUF is cached under."""
    from shoefix_tasks.model.adapter import adapter_digest, verify_adapter
    from shoefix_tasks.records import sha256_file

    return f"{adapter_digest(verify_adapter(adapter_dir))[:32]}-{sha256_file(base_gguf)[:16]}"


def adapter_gguf_for(adapter_dir: Path, base_gguf: Path, settings: Settings) -> Path:
    """The adapter's GGUF form, converted once into a cache keyed by the adapter's digest and the
    base GGUF's hash (the conversion is deterministic, so a cached file equals a fresh one)."""
    from shoefix_tasks.model.gguf_adapter import write_adapter_gguf

    out = settings.home / "cache" / "gguf-adapters" / f"{_cache_key(adapter_dir, base_gguf)}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_adapter_gguf(adapter_dir, base_gguf, out)
    return out


def served_gguf_for(adapter_dir: Path, base_gguf: Path, settings: Settings) -> Path:
    """The adapter's served form, the base with the LoRA merged in (FORM_MERGED), derived once into a cache
    keyed by the adapter's digest, the base GGUF's hash and the merge's format and type (deterministic, so
    a cached file equals a fresh one: evaluation opens the bytes that registration records). The sha256
    written beside it at derivation is checked on every reuse; a file that no longer matches is derived
    again."""
    import hashlib

    from shoefix_tasks.model.gguf_merge import FORMAT, SERVED_TYPE, write_merged_gguf
    from shoefix_tasks.records import sha256_file

    fmt = hashlib.sha256(f"{FORMAT}/{SERVED_TYPE}".encode()).hexdigest()[:8]
    out = settings.home / "cache" / "gguf-merged" / f"{_cache_key(adapter_dir, base_gguf)}-{fmt}.gguf"
    recorded = out.with_name(out.name + ".sha256")
    if out.is_file() and recorded.is_file() and sha256_file(out) == recorded.read_text().strip():
        return out
    if out.is_file():
        log.warning("cached served file %s does not match the hash recorded at its derivation: deriving again",
                    out.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = write_merged_gguf(base_gguf, adapter_dir, out, SERVED_TYPE)["sha256"]
    recorded.write_text(sha + "\n")
    return out


def check_same_source(ident: dict[str, Any], base_gguf: Path) -> None:
    """The GGUF llama.cpp loads must be the one the trainer's base was dequantized from."""
    from shoefix_tasks.model.base import BaseModelMismatch
    from shoefix_tasks.records import sha256_file

    recorded = (ident.get("source") or {}).get("sha256")
    if recorded != sha256_file(base_gguf):
        raise BaseModelMismatch(f"{base_gguf.name} is not the file the base {ident.get('name')} was converted from "
                                f"(recorded {str(recorded)[:12]})")


def open_engine(base_model: str, adapter_dir: Path | None, settings: Settings, *, dtype: str = "float32",
                repetition_penalty: float = 1.0, engine: str = "auto", label: str = "",
                served_gguf: Path | None = None, served_form: str = FORM_MERGED, batch_size: int = 8,
                adapter_gguf: Path | None = None) -> Engine:
    """The engine that serves `base_model` (+ the adapter in `adapter_dir`, verified against its manifest
    and its recorded base first). `served_gguf`: an already verified served artifact of `served_form`
    (registry/served); without it the adapter's served form is derived (cached). `dtype` and `batch_size`
    apply to transformers. `adapter_gguf` is how models logged before the merge ask for their verified
    runtime-LoRA file (MLflow runs the serving.py copied into them when they were logged)."""
    if adapter_gguf is not None:
        served_gguf, served_form = adapter_gguf, FORM_LORA
    from shoefix_tasks.model.generation import load_answerer

    label = label or ("base" if adapter_dir is None else adapter_dir.name)
    kind = choose_engine(base_model, engine)
    if kind == "transformers":
        return TransformersEngine(load_answerer(base_model, adapter_dir, settings, dtype, label=label),
                                  repetition_penalty, batch_size)
    base_gguf = shipped_gguf(base_model)
    if base_gguf is None:
        raise ValueError(f"base {base_model!r} ships no GGUF: llama.cpp cannot serve it (use transformers)")
    manifest = None
    if adapter_dir is not None:
        from shoefix_tasks.model.adapter import verify_adapter
        from shoefix_tasks.model.base import base_identity, check_compatible

        manifest = verify_adapter(adapter_dir)
        ident = base_identity(base_model, settings)
        check_compatible(manifest["base"], ident, f"adapter {label}")
        check_same_source(ident, base_gguf)
        if served_form == FORM_LORA:
            return LlamaCppEngine(base_gguf, served_gguf or adapter_gguf_for(adapter_dir, base_gguf, settings),
                                  repetition_penalty, label, manifest)
        if served_form != FORM_MERGED:
            raise ValueError(f"unknown served form {served_form!r} ({FORM_LORA}, {FORM_MERGED})")
        return LlamaCppEngine(served_gguf or served_gguf_for(adapter_dir, base_gguf, settings), None,
                              repetition_penalty, label, manifest, form=FORM_MERGED)
    return LlamaCppEngine(base_gguf, None, repetition_penalty, label)
