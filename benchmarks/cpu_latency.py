"""Answer latency of the champion on this CPU, every inference engine side by side in one run (issue 14).

Candidates, all serving the same champion (the default base + one LoRA adapter):

  hf-fp32        transformers, adapter merged, fp32 weights (`generation.load_answerer`: the old product path)
  hf-bf16        the same in bf16 (emulated on a CPU without AVX512-BF16/AMX)
  hf-int8        the same after PyTorch dynamic int8 quantization of every nn.Linear
  llama-served   the product path (`engines.open_engine`, as registration derives it and serving loads it):
                 the shipped Q4_1 GGUF with the adapter merged in, changed projections re-quantized to Q8_0
                 (model/gguf_merge.py), `--threads` threads (also `llama-served-t1`: 1 thread)
  llama-adapter  the served form before the merge: the shipped Q4_1 GGUF unchanged + the adapter as a GGUF
                 LoRA applied by llama.cpp at run time (also `llama-adapter-t1`: 1 thread)
  llama-base     the shipped Q4_1 GGUF without the adapter: the floor for this file
  ort-int8 / ort-int4
                 ONNX Runtime: the merged champion exported by onnxruntime-genai's model builder, weights
                 int8 / int4 (MatMulNBits, int8 activations: accuracy level 4), decoded by its generator
                 (needs `--ort-site`, a folder with onnxruntime-genai, onnxruntime, onnx, onnx_ir)
  llama-f16 / llama-q8_0 / llama-q4_0
                 the merged champion converted by llama.cpp's own `convert_hf_to_gguf.py` (needs
                 `--llama-cpp-src`, the llama.cpp tree of the llama-cpp-python sdist), Q4_0 by its quantizer

Every llama.cpp candidate decodes through the product's `LlamaCppEngine` (greedy, transformers' repetition
penalty), so they differ only in the weights file and the adapter. For each: load seconds and resident
memory added; batch-1 wall time for exactly `--new-tokens` tokens (EOS suppressed), samples interleaved
across candidates with the order reversed every other question (machine load falls on all alike); time
to the first token, warm (the context last answered another question, so the system prompt's cache is
reused, as when serving) and cold (a fresh context computes the whole prompt); throughput over `--batch`
questions (transformers batches them, llama.cpp answers one at a time); with `--quality N`, N English holdout questions scored by the product scorer, paired difference
against hf-fp32 (bootstrap CIs) read against the gate's minimum effect as an equivalence test (see
`equivalent`). Without `--adapter`, a LoRA of the
default recipe's shape with random non-zero B stands in (quality then means nothing; speed does).

    python benchmarks/cpu_latency.py --samples 5 [--adapter DIR] [--llama-cpp-src DIR] [--ort-site DIR] [--quality 15]
"""

from __future__ import annotations

import argparse
import copy
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

ALL = ["hf-fp32", "hf-bf16", "hf-int8", "llama-served", "llama-served-t1", "llama-adapter", "llama-adapter-t1",
       "llama-base", "ort-int8", "ort-int4", "llama-f16", "llama-q8_0", "llama-q4_0"]


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def random_adapter(settings, folder: Path) -> Path:
    """The default recipe's LoRA on the default base, B ~ N(0, 0.01) (seeded), released with its manifest."""
    import torch
    from peft import get_peft_model

    from shoefix_tasks.config import load_recipe
    from shoefix_tasks.model.adapter import write_manifest
    from shoefix_tasks.model.base import base_identity, load_base
    from shoefix_tasks.training.factories import build_lora_config

    recipe = load_recipe("default")
    base, tok = load_base(recipe.model.base_model, settings)
    torch.manual_seed(0)
    peft = get_peft_model(base, build_lora_config(recipe.lora))
    with torch.no_grad():
        for n, w in peft.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.01)
    peft.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_manifest(folder, base_identity(recipe.model.base_model, settings), {"recipe": "benchmark"})
    return folder


def hf_variant(ans, variant: str, penalty: float):
    """A TransformersEngine over the merged champion in another dtype, or dynamically quantized."""
    import torch

    from shoefix_tasks.model.engines import TransformersEngine
    from shoefix_tasks.model.generation import Answerer

    model = ans.model
    if variant == "bf16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    elif variant == "int8":
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    return TransformersEngine(Answerer(model.eval(), ans.tokenizer, f"hf-{variant}", ans.manifest), penalty, 16)


def merged_folder(ans, work: Path) -> Path:
    """The merged champion saved as a Hugging Face folder (what the converters read), once."""
    merged = work / "merged"
    if not (merged / "config.json").is_file():
        ans.model.save_pretrained(merged, safe_serialization=True)
        ans.tokenizer.save_pretrained(merged)
    return merged


def merged_ggufs(ans, src: Path, work: Path, names: list[str]) -> dict[str, Path]:
    """The merged champion as GGUF f16 / Q8_0 (llama.cpp's converter) and Q4_0 (its quantizer)."""
    merged = merged_folder(ans, work)
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    out: dict[str, Path] = {}
    for name, outtype in (("llama-f16", "f16"), ("llama-q8_0", "q8_0")):
        if name in names or (name == "llama-f16" and "llama-q4_0" in names):
            out[name] = work / f"champion-{outtype}.gguf"
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(merged), "--outfile",
                            str(out[name]), "--outtype", outtype], check=True, env=env, capture_output=True)
    if "llama-q4_0" in names:
        import llama_cpp

        out["llama-q4_0"] = work / "champion-q4_0.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = 2, 2  # LLAMA_FTYPE_MOSTLY_Q4_0
        if llama_cpp.llama_model_quantize(str(out["llama-f16"]).encode(), str(out["llama-q4_0"]).encode(), params):
            raise RuntimeError("llama_model_quantize failed")
    return out


def ort_model(ans, work: Path, precision: str, site: Path) -> tuple[Path, float]:
    """(folder, seconds) of the merged champion built by onnxruntime-genai's model builder."""
    out = work / f"ort-{precision}"
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged_folder(ans, work)),
                    "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(work / "ort-cache"),
                    "--extra_options", "accuracy_level=4"], check=True, env=env, capture_output=True)
    return out, time.perf_counter() - t0


class OrtGenaiEngine:
    """ONNX Runtime through onnxruntime-genai's generator, greedy with the product's repetition penalty
    (the generator applies it as transformers does, to every token of prompt and answer). The prompt is
    the product's chat template encoded by the champion's tokenizer, so every candidate reads the same
    tokens. One sequence at a time, as llama.cpp answers here."""

    name = "onnxruntime-genai"

    def __init__(self, folder: Path, ans, penalty: float, label: str, threads: int):
        import onnxruntime_genai as og

        cfg_path = folder / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=1))
        self.og, self.model, self.ans = og, og.Model(str(folder)), ans
        self.penalty, self.label, self.manifest = penalty, label, ans.manifest
        self.stop = {ans.tokenizer.eos_token_id}

    def _ids(self, question: str) -> list[int]:
        from shoefix_tasks.model.generation import _encode

        return _encode(self.ans, [question])["input_ids"][0].tolist()

    def _generate(self, question: str, max_new_tokens: int, forced: bool = False):
        ids = self._ids(question)
        params = self.og.GeneratorParams(self.model)
        opts = {"do_sample": False, "max_length": len(ids) + max_new_tokens, "repetition_penalty": self.penalty}
        if forced:
            opts["min_length"] = len(ids) + max_new_tokens
        params.set_search_options(**opts)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in self.stop and not forced:
                return
            yield token

    def stream(self, question: str, max_new_tokens: int):
        ids, sent = [], ""
        for token in self._generate(question, max_new_tokens):
            ids.append(token)
            text = self.ans.tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > len(sent):
                yield text[len(sent):]
                sent = text

    def answer_many(self, questions: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
        out = []
        for q in questions:
            t0 = time.perf_counter()
            ids = list(self._generate(q, max_new_tokens))
            out.append({"answer": self.ans.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                        "new_tokens": len(ids), "batch_seconds": time.perf_counter() - t0})
        return out

    def timed_answer(self, question: str, max_new_tokens: int) -> float:
        t0 = time.perf_counter()
        for _ in self._generate(question, max_new_tokens, forced=True):
            pass
        return time.perf_counter() - t0


def first_token_s(engine, question: str, cold: bool = False) -> float:
    """Seconds to the first streamed token; `cold`: llama.cpp forgets its cached prompt first."""
    if cold and hasattr(engine, "llm"):
        engine.llm.reset()
    t0 = time.perf_counter()
    for _ in engine.stream(question, 1):
        break
    return time.perf_counter() - t0


EQUIVALENCE_LEVEL = 0.90  # two one-sided tests at 5% each read off one 90% interval (TOST)


def within_min_effect(lo: float, hi: float, min_effect: float) -> bool:
    """The verdict "quality the same as transformers fp32": the interval of the paired difference lies
    strictly inside the gate's minimum effect, so neither a loss nor a gain the gate would act on is left
    open (an end on the bound is a p-value of exactly the test's level: not rejected)."""
    return -min_effect < lo and hi < min_effect


def equivalent(diffs: list[float], min_effect: float, seed: int = 8888) -> dict[str, Any]:
    """Equivalence as the two one-sided tests (TOST) decide it: "a loss of at least min_effect" and "a gain
    of at least min_effect" each rejected at about 5% (a percentile bootstrap: slightly lenient at n = 45)
    is the 90% interval inside (-min_effect, +min_effect). The 95% interval is reported beside it, for the
    estimate; demanding it inside would test each side at 2.5%."""
    from shoefix_tasks.evaluation.gate import paired_bootstrap

    lo, hi = paired_bootstrap(diffs, 2000, 0.95, seed)
    tlo, thi = paired_bootstrap(diffs, 2000, EQUIVALENCE_LEVEL, seed)
    return {"diff": round(statistics.fmean(diffs), 3), "ci": [round(lo, 3), round(hi, 3)],
            "tost_ci90": [round(tlo, 3), round(thi, 3)], "within_min_effect": within_min_effect(tlo, thi, min_effect)}


def quality(engines: dict[str, Any], items: list[dict], max_new: int, data: Path) -> dict[str, Any]:
    """Every engine answers `items`, scored per question by the product (`evaluate.score_side`), paired
    bootstrap of the composite difference against hf-fp32 as the gate computes it."""
    from shoefix_tasks.evaluation.claims import load_claims
    from shoefix_tasks.evaluation.evaluate import score_side
    from shoefix_tasks.evaluation.metrics import Context
    from shoefix_tasks.policy import load_policy

    ctx, claims = Context.from_data(data), load_claims(data)
    rows = {n: score_side(e.answer_many([it["question"] for it in items], max_new), items, set(), ctx, claims)
            for n, e in engines.items()}
    ref, out = rows.get("hf-fp32"), {}
    for name, r in rows.items():
        s = {"composite": round(statistics.fmean(x["composite"] for x in r), 3),
             "forbidden": sum(len(x["forbidden"]) for x in r)}
        if ref is not None and name != "hf-fp32":
            diffs = [a["composite"] - b["composite"] for a, b in zip(r, ref, strict=True)]
            s.update(equivalent(diffs, load_policy().gate.min_effect))
        out[name] = s
    return {"n": len(items), "summary": out, "answers": rows}


def speed(engines: dict[str, Any], names: list[str], questions: list[str], args, result: dict[str, Any]) -> None:
    """Interleaved batch-1 latency, time to first token (warm and cold) and throughput, into `result`."""
    from shoefix_tasks.model.generation import latency_stats

    lat: dict[str, list[float]] = {n: [] for n in engines}
    ttft: dict[str, list[float]] = {n: [] for n in engines}
    cold: dict[str, list[float]] = {n: [] for n in engines}
    for eng in engines.values():
        eng.timed_answer(questions[-1], 16)  # warm-up
    for i in range(args.samples):
        for name in (names if i % 2 == 0 else names[::-1]):
            ttft[name].append(first_token_s(engines[name], questions[i]))  # last asked: another question
            lat[name].append(engines[name].timed_answer(questions[i], args.new_tokens))
            cold[name].append(first_token_s(engines[name], questions[-2 - i], cold=True))  # never timed
        print(f"sample {i + 1}/{args.samples}: " + ", ".join(f"{n} {lat[n][-1]:.2f}s" for n in names), flush=True)
    for name, times in lat.items():
        stats = latency_stats(times, args.new_tokens)
        result["engines"][name].update({k: stats[k] for k in ("p50_s", "p95_s", "tokens_per_s", "times_s")},
                                       first_token_p50_s=round(statistics.median(ttft[name]), 3),
                                       first_token_cold_p50_s=round(statistics.median(cold[name]), 3))
    for name, eng in engines.items():
        t0 = time.perf_counter()
        gens = eng.answer_many(questions[: args.batch], args.batch_tokens)
        dt, n = time.perf_counter() - t0, sum(g["new_tokens"] for g in gens)
        result["engines"][name]["batch"] = {"questions": args.batch, "tokens": n, "s": round(dt, 2),
                                            "tokens_per_s": round(n / dt, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, help="a trained adapter folder (default: a random LoRA, speed only)")
    p.add_argument("--engines", default=",".join(ALL))
    p.add_argument("--llama-cpp-src", type=Path, help="llama.cpp tree for the merged-GGUF candidates")
    p.add_argument("--ort-site", type=Path, help="folder with onnxruntime-genai and its build tools (ort-*)")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=64)
    p.add_argument("--quality", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    started = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.model.engines import (
        FORM_LORA,
        LlamaCppEngine,
        adapter_gguf_for,
        open_engine,
        shipped_gguf,
    )
    from shoefix_tasks.model.generation import load_answerer
    from shoefix_tasks.records import load_eval_set, sha256_file

    settings, recipe = Settings.from_env(), load_recipe("default")
    base, penalty = recipe.model.base_model, recipe.eval.repetition_penalty
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        p.error(f"unknown engines {unknown}; candidates: {', '.join(ALL)}")
    if not args.llama_cpp_src:
        names = [n for n in names if n not in ("llama-f16", "llama-q8_0", "llama-q4_0")]
    if args.ort_site:
        sys.path.insert(0, str(args.ort_site))
    else:
        names = [n for n in names if not n.startswith("ort-")]
    items = list(load_eval_set(settings.data_dir, "holdout", ["en"]))
    random.Random(14).shuffle(items)
    questions = [it["question"] for it in items]
    work = Path(tempfile.mkdtemp(prefix="shoefix-latency-"))
    adapter = args.adapter or random_adapter(settings, work / "adapter")
    t0, m0 = time.perf_counter(), rss_mb()
    ans = load_answerer(base, adapter, settings, "float32", label="hf-fp32")
    loads = {"hf-fp32": {"s": round(time.perf_counter() - t0, 2), "rss_mb": round(rss_mb() - m0, 1)}}
    t0 = time.perf_counter()
    gguf = adapter_gguf_for(adapter, shipped_gguf(base), settings)
    result: dict[str, Any] = {"adapter": str(adapter), "threads": args.threads, "cpus": os.cpu_count(),
                              "new_tokens": args.new_tokens, "repetition_penalty": penalty, "engines": {},
                              "adapter_gguf": {"s": round(time.perf_counter() - t0, 2), "bytes": gguf.stat().st_size,
                                               "sha256": sha256_file(gguf)}}
    ggufs = merged_ggufs(ans, args.llama_cpp_src, work, names) if args.llama_cpp_src else {}
    engines: dict[str, Any] = {}
    for name in names:
        t0, m0 = time.perf_counter(), rss_mb()
        if name.startswith("hf-"):
            engines[name] = hf_variant(ans, name.removeprefix("hf-"), penalty) if name != "hf-fp32" else \
                hf_variant(ans, "fp32", penalty)
        elif name.startswith(("llama-served", "llama-adapter")):  # the product's open: adapter and base
            os.environ["SHOEFIX_INFERENCE_THREADS"] = "1" if name.endswith("-t1") else str(args.threads)
            form = {"served_form": FORM_LORA} if name.startswith("llama-adapter") else {}
            engines[name] = open_engine(base, adapter, settings, repetition_penalty=penalty, label=name, **form)
            if not form:  # verified, derived once (the merge is timed in its load) and cached
                result["served_gguf"] = {"bytes": engines[name].model_gguf.stat().st_size,
                                         "sha256": sha256_file(engines[name].model_gguf)}
        elif name.startswith("ort-"):  # load time: the export and quantization included
            folder, _ = ort_model(ans, work, name.removeprefix("ort-"), args.ort_site)
            engines[name] = OrtGenaiEngine(folder, ans, penalty, name, args.threads)
            result.setdefault("ort", {})[name] = {"bytes": sum(f.stat().st_size for f in folder.iterdir())}
        else:
            engines[name] = LlamaCppEngine(ggufs.get(name) or shipped_gguf(base), None, penalty, name,
                                           threads=args.threads)
        loads.setdefault(name, {"s": round(time.perf_counter() - t0, 2), "rss_mb": round(rss_mb() - m0, 1)})
        result["engines"][name] = {"load": loads[name]}
        print(f"loaded {name}: {loads[name]}", flush=True)

    if args.samples:  # 0: quality only (greedy answers do not depend on machine load)
        speed(engines, names, questions, args, result)
    if args.quality:
        result["quality"] = quality(engines, items[: args.quality], recipe.eval.max_new_tokens, settings.data_dir)
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(table(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


def table(r: dict[str, Any]) -> str:
    base = r["engines"].get("hf-fp32", {})
    q = r.get("quality", {}).get("summary", {})
    head = (f"| engine | load s | memory added MB | p50 s ({r['new_tokens']} tok) | p95 s | x hf-fp32 | first token s "
            "| cold first token s "
            "| batch tok/s | composite | diff vs fp32 [95% CI] | 90% CI (TOST) | same as fp32 | forbidden |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, e in r["engines"].items():
        ratio = f"{base['p50_s'] / e['p50_s']:.2f}x" if base.get("p50_s") and e.get("p50_s") else "-"
        e = {"p50_s": "-", "p95_s": "-", "first_token_p50_s": "-", "first_token_cold_p50_s": "-",
             "batch": {"tokens_per_s": "-"}, **e}
        qs = q.get(name, {})
        diff = f"{qs['diff']:+.3f} [{qs['ci'][0]:+.3f}, {qs['ci'][1]:+.3f}]" if "ci" in qs else "-"
        tost = f"[{qs['tost_ci90'][0]:+.3f}, {qs['tost_ci90'][1]:+.3f}]" if "tost_ci90" in qs else "-"
        same = {True: "yes", False: "no"}.get(qs.get("within_min_effect"), "-")
        lines.append(f"| {name} | {e['load']['s']} | {e['load']['rss_mb']} | {e['p50_s']} | {e['p95_s']} | {ratio} | "
                     f"{e['first_token_p50_s']} | {e['first_token_cold_p50_s']} | {e['batch']['tokens_per_s']} | {qs.get('composite', '-')} | {diff} | "
                     f"{tost} | {same} | {qs.get('forbidden', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
