"""Inference engines for the champion on this CPU, side by side in one run (issue 14).

Candidates, all serving the same champion (the default base with a trained LoRA adapter, verified and
merged by `generation.load_answerer`, the product path):

  hf-fp32        transformers, fp32 weights: what serving and evaluation run today
  hf-bf16        transformers, bf16 weights (emulated on a CPU without AVX512-BF16/AMX)
  hf-int8        transformers after PyTorch dynamic int8 quantization of every nn.Linear
  llama-f16      llama.cpp (llama-cpp-python), the merged model converted to GGUF f16
  llama-q8_0     the same GGUF quantized to 8 bits (Q8_0)
  llama-q4_0     the same GGUF quantized to 4 bits (Q4_0; the k-quants' 256-wide super-blocks do not divide
                 SmolLM2's 576-wide rows, so Q4_K_M would fall back to other types for most tensors)

For each: load seconds and resident memory added; batch-1 latency for exactly `--new-tokens` tokens
(EOS suppressed, so no engine is faster by answering shorter) and time to the first token, the samples
interleaved across engines with the order reversed every other question (machine load falls on all
alike); throughput over `--batch` questions (transformers batches them; llama-cpp-python's API answers
one at a time); and, with `--quality N`, N English holdout questions answered with the product's
decoding by every engine and scored by the product scorer, with the paired difference against hf-fp32
(bootstrap CI) read against the gate's minimum effect.

The GGUF conversion uses llama.cpp's own `convert_hf_to_gguf.py` (`--llama-cpp-src`: the llama.cpp
source tree, e.g. `vendor/llama.cpp` of the llama-cpp-python source distribution).

    python benchmarks/cpu_engines.py --adapter <adapter dir> --llama-cpp-src <dir> --samples 5 --quality 15
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ALL = ["hf-fp32", "hf-bf16", "hf-int8", "llama-f16", "llama-q8_0", "llama-q4_0"]
LLAMA_FTYPE = {"llama-q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_0


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class HFEngine:
    """The product's transformers path, with the weights in another dtype or dynamically quantized."""

    def __init__(self, name: str, ans, variant: str):
        import torch

        self.name, self.tok = name, ans.tokenizer
        model = ans.model
        if variant == "bf16":
            import copy

            model = copy.deepcopy(model).to(torch.bfloat16)
        elif variant == "int8":
            import copy

            model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.eval()

    def _enc(self, prompts: list[str]):
        return self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def answer(self, prompt: str, max_new: int, forced: bool, penalty: float) -> tuple[str, float, int]:
        import torch

        enc = self._enc([prompt])
        kw = {"min_new_tokens": max_new} if forced else {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_new, do_sample=False, repetition_penalty=penalty,
                                      pad_token_id=self.tok.pad_token_id, **kw)
        dt = time.perf_counter() - t0
        new = out[0, enc["input_ids"].shape[1]:]
        return self.tok.decode(new, skip_special_tokens=True).strip(), dt, int(new.numel())

    def first_token_s(self, prompt: str, penalty: float) -> float:
        return self.answer(prompt, 1, True, penalty)[1]

    def batch(self, prompts: list[str], max_new: int, penalty: float) -> tuple[float, int]:
        import torch

        enc = self._enc(prompts)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                      repetition_penalty=penalty, pad_token_id=self.tok.pad_token_id)
        return time.perf_counter() - t0, int(out[:, enc["input_ids"].shape[1]:].numel())


class LlamaEngine:
    """llama.cpp through llama-cpp-python: greedy, the product's repetition penalty over the whole context
    (llama.cpp's default window is the last 64 tokens; transformers penalises every earlier token)."""

    def __init__(self, name: str, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.name = name
        self.llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                         last_n_tokens_size=1024, verbose=False, seed=0)
        self.eos = self.llm.token_eos()

    def _kw(self, max_new: int, forced: bool, penalty: float) -> dict[str, Any]:
        return {"max_tokens": max_new, "temperature": 0.0, "top_k": 1, "repeat_penalty": penalty,
                "logit_bias": {self.eos: -1e9} if forced else None}

    def answer(self, prompt: str, max_new: int, forced: bool, penalty: float) -> tuple[str, float, int]:
        t0 = time.perf_counter()
        out = self.llm.create_completion(prompt, **self._kw(max_new, forced, penalty))
        dt = time.perf_counter() - t0
        return out["choices"][0]["text"].strip(), dt, int(out["usage"]["completion_tokens"])

    def first_token_s(self, prompt: str, penalty: float) -> float:
        t0 = time.perf_counter()
        for _ in self.llm.create_completion(prompt, stream=True, **self._kw(8, True, penalty)):
            return time.perf_counter() - t0
        return float("nan")

    def batch(self, prompts: list[str], max_new: int, penalty: float) -> tuple[float, int]:
        t0, n = time.perf_counter(), 0
        for p in prompts:
            n += self.answer(p, max_new, True, penalty)[2]
        return time.perf_counter() - t0, n


def convert_to_gguf(merged: Path, src: Path, work: Path, names: list[str]) -> dict[str, Path]:
    """Deterministic conversion of the merged champion: f16 and Q8_0 by llama.cpp's converter, Q4_0 by
    llama.cpp's quantizer from the f16 file. Each file's sha256 is printed with the results."""
    out: dict[str, Path] = {}
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    for name, outtype in (("llama-f16", "f16"), ("llama-q8_0", "q8_0")):
        if name in names or (name == "llama-f16" and "llama-q4_0" in names):
            path = work / f"champion-{outtype}.gguf"
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(merged), "--outfile", str(path),
                            "--outtype", outtype], check=True, env=env, capture_output=True)
            out[name] = path
    if "llama-q4_0" in names:
        import llama_cpp

        path = work / "champion-q4_0.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE["llama-q4_0"]
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(out["llama-f16"]).encode(), str(path).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed: {rc}")
        out["llama-q4_0"] = path
    return out


def sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quality(engines: dict[str, Any], items: list[dict], prompts: list[str], max_new: int, penalty: float,
            data: Path) -> dict[str, Any]:
    """Every engine answers `items`; the product's per-question scoring (`evaluate.score_side`: the
    scorecard and every forbidden claim) and the gate's paired bootstrap against hf-fp32."""
    from shoefix_tasks.evaluation.claims import load_claims
    from shoefix_tasks.evaluation.evaluate import score_side
    from shoefix_tasks.evaluation.gate import paired_bootstrap
    from shoefix_tasks.evaluation.metrics import Context
    from shoefix_tasks.policy import load_policy

    ctx, claims = Context.from_data(data), load_claims(data)
    detail: dict[str, list[dict[str, Any]]] = {}
    for name, eng in engines.items():
        gens = [dict(zip(("answer", "seconds", "new_tokens"), eng.answer(p, max_new, False, penalty), strict=True))
                for p in prompts]
        detail[name] = score_side(gens, items, set(), ctx, claims)
        print(f"quality {name}: composite {statistics.fmean(r['composite'] for r in detail[name]):.3f}", flush=True)
    ref = detail.get("hf-fp32")
    summary = {}
    for name, rows in detail.items():
        row = {"composite": round(statistics.fmean(r["composite"] for r in rows), 3),
               "key_data_accuracy": round(statistics.fmean(r["key_data_accuracy"] for r in rows), 3),
               "forbidden": sum(len(r["forbidden"]) for r in rows)}
        if ref is not None and name != "hf-fp32":
            diffs = [a["composite"] - b["composite"] for a, b in zip(rows, ref, strict=True)]
            lo, hi = paired_bootstrap(diffs, 2000, 0.95, 8888)
            row.update(diff_vs_fp32=round(statistics.fmean(diffs), 3), ci=[round(lo, 3), round(hi, 3)],
                       within_min_effect=max(abs(lo), abs(hi)) <= load_policy().gate.min_effect)
        summary[name] = row
    return {"n": len(items), "max_new_tokens": max_new, "summary": summary, "answers": detail}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, required=True, help="a trained adapter folder (with its manifest)")
    p.add_argument("--engines", default=",".join(ALL))
    p.add_argument("--llama-cpp-src", type=Path, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)")
    p.add_argument("--samples", type=int, default=5, help="timed batch-1 answers per engine")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="questions in the throughput run")
    p.add_argument("--batch-tokens", type=int, default=128)
    p.add_argument("--quality", type=int, default=0, help="English holdout questions answered by every engine")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    started = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.model.generation import latency_stats, load_answerer
    from shoefix_tasks.model.prompting import prompt_messages
    from shoefix_tasks.records import load_eval_set

    settings, recipe = Settings.from_env(), load_recipe("default")
    penalty = recipe.eval.repetition_penalty
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    items = [r for r in load_eval_set(settings.data_dir, "holdout", ["en"])]
    random.Random(14).shuffle(items)
    t0, m0 = time.perf_counter(), rss_mb()
    ans = load_answerer(recipe.model.base_model, args.adapter, settings, "float32", label="champion")
    base_load = {"s": round(time.perf_counter() - t0, 2), "rss_mb": round(rss_mb() - m0, 1)}
    prompts = [ans.tokenizer.apply_chat_template(prompt_messages(it["question"]), tokenize=False,
                                                 add_generation_prompt=True) for it in items]
    result: dict[str, Any] = {"adapter": str(args.adapter), "threads": args.threads, "cpus": os.cpu_count(),
                              "new_tokens": args.new_tokens, "repetition_penalty": penalty, "engines": {}}
    work = Path(tempfile.mkdtemp(prefix="shoefix-engines-"))
    ggufs: dict[str, Path] = {}
    if any(n.startswith("llama") for n in names):
        if not args.llama_cpp_src:
            p.error("llama engines need --llama-cpp-src")
        merged = work / "merged"
        ans.model.save_pretrained(merged, safe_serialization=True)
        ans.tokenizer.save_pretrained(merged)
        t0 = time.perf_counter()
        ggufs = convert_to_gguf(merged, args.llama_cpp_src, work, names)
        result["conversion_s"] = round(time.perf_counter() - t0, 1)
        result["gguf"] = {n: {"bytes": f.stat().st_size, "sha256": sha256(f)} for n, f in ggufs.items()}
        print(json.dumps(result["gguf"]), flush=True)

    engines: dict[str, Any] = {}
    for name in names:
        t0, m0 = time.perf_counter(), rss_mb()
        if name.startswith("hf-"):
            engines[name] = HFEngine(name, ans, name.removeprefix("hf-"))
        else:
            engines[name] = LlamaEngine(name, ggufs[name], args.threads)
        load = {"s": round(time.perf_counter() - t0, 2), "rss_mb": round(rss_mb() - m0, 1)}
        if name == "hf-fp32":
            load = base_load  # the model load_answerer built (verification, dequantization, merge)
        result["engines"][name] = {"load": load}
        print(f"loaded {name}: {load}", flush=True)

    # latency: warm-up, then interleaved samples (ABBA)
    lat: dict[str, list[float]] = {n: [] for n in engines}
    ttft: dict[str, list[float]] = {n: [] for n in engines}
    order = list(engines)
    for eng in engines.values():
        eng.answer(prompts[-1], 16, True, penalty)
    for i in range(args.samples):
        for name in (order if i % 2 == 0 else order[::-1]):
            eng = engines[name]
            _, dt, n = eng.answer(prompts[i], args.new_tokens, True, penalty)
            assert n == args.new_tokens, (name, n)
            lat[name].append(dt)
            ttft[name].append(eng.first_token_s(prompts[i], penalty))
        print(f"latency sample {i + 1}/{args.samples}: " + ", ".join(f"{n} {lat[n][-1]:.2f}s" for n in order), flush=True)
    for name, times in lat.items():
        stats = latency_stats(times, args.new_tokens)
        result["engines"][name].update({k: stats[k] for k in ("p50_s", "p95_s", "tokens_per_s", "times_s")},
                                       first_token_p50_s=round(statistics.median(ttft[name]), 3))

    for name, eng in engines.items():
        dt, n = eng.batch(prompts[: args.batch], args.batch_tokens, penalty)
        result["engines"][name]["batch"] = {"questions": args.batch, "tokens": n, "s": round(dt, 2),
                                            "tokens_per_s": round(n / dt, 1)}
        print(f"batch {name}: {n / dt:.1f} tokens/s", flush=True)

    if args.quality:
        from shoefix_tasks.model.generation import tokens_needed
        from shoefix_tasks.policy import load_policy

        max_new = max(recipe.eval.max_new_tokens, tokens_needed(ans, [it["answer"] for it in items[: args.quality]],
                                                                load_policy().evaluation.token_margin))
        result["quality"] = quality(engines, items[: args.quality], prompts[: args.quality], max_new, penalty,
                                    settings.data_dir)
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(table(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    del engines, ans
    gc.collect()
    return 0


def table(r: dict[str, Any]) -> str:
    base = r["engines"].get("hf-fp32", {})
    q = r.get("quality", {}).get("summary", {})
    head = (f"| engine | load s | memory added MB | p50 s ({r['new_tokens']} tok) | p95 s | x hf-fp32 | first token s | batch tok/s "
            "| composite | diff vs fp32 [95% CI] | forbidden |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, e in r["engines"].items():
        speed = f"{base['p50_s'] / e['p50_s']:.2f}x" if base.get("p50_s") else "-"
        qs = q.get(name, {})
        diff = f"{qs['diff_vs_fp32']:+.3f} [{qs['ci'][0]:+.3f}, {qs['ci'][1]:+.3f}]" if "ci" in qs else "-"
        lines.append(f"| {name} | {e['load']['s']} | {e['load']['rss_mb']} | {e['p50_s']} | {e['p95_s']} | {speed} | "
                     f"{e['first_token_p50_s']} | {e['batch']['tokens_per_s']} | {qs.get('composite', '-')} | {diff} | "
                     f"{qs.get('forbidden', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
