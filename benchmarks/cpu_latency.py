"""Answer latency of the embedded default on this CPU: SmolLM2-135M-Instruct with a merged LoRA adapter,
batch 1, exactly 256 new tokens, through the product path (`generation.load_answerer` +
`generation.measure_latency`, the default recipe's decoding). The adapter is the default recipe's LoRA
shape with random non-zero B (merging makes it the base architecture: its values do not change the cost).

    python benchmarks/cpu_latency.py --samples 5 --out /tmp/cpu-latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--static-samples", type=int, default=3, help="also time the static-cache path (0 = skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import get_peft_model

    from shoefix_tasks.config import Settings, load_recipe
    from shoefix_tasks.model.adapter import write_manifest
    from shoefix_tasks.model.base import base_identity, load_base
    from shoefix_tasks.model.generation import load_answerer, measure_latency
    from shoefix_tasks.records import read_jsonl
    from shoefix_tasks.training.factories import build_lora_config

    recipe = load_recipe("default")
    settings = Settings.from_env()
    questions = [r["question"] for r in sorted(read_jsonl(settings.data_dir / "holdout" / "materials.jsonl"),
                                               key=lambda r: r["id"]) if r["lang"] == "en"][: args.samples]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        base, tok = load_base(recipe.model.base_model, settings, recipe.model.dtype)
        peft = get_peft_model(base, build_lora_config(recipe.lora))
        torch.manual_seed(0)
        with torch.no_grad():
            for n, w in peft.named_parameters():
                if "lora_B" in n:
                    w.normal_(0, 0.01)
        peft.save_pretrained(adapter)
        tok.save_pretrained(adapter)
        write_manifest(adapter, base_identity(recipe.model.base_model, settings), {"recipe": "benchmark"})
        del peft, base
        ans = load_answerer(recipe.model.base_model, adapter, settings, recipe.model.dtype, label="bench")
    out = {"model": recipe.model.base_model, "dtype": recipe.model.dtype, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "new_tokens": args.new_tokens, "repetition_penalty": recipe.eval.repetition_penalty,
           "prompt_tokens": [int(ans.tokenizer.apply_chat_template(
               [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True)["input_ids"].__len__())
               for q in questions]}
    t0 = time.perf_counter()
    out["product_path"] = measure_latency(ans, questions, args.new_tokens, recipe.eval.repetition_penalty)
    out["product_path_wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)
    if args.static_samples:
        ans.static_cache_len = 1024
        out["static_cache"] = measure_latency(ans, questions[: args.static_samples], args.new_tokens,
                                              recipe.eval.repetition_penalty)
    print(json.dumps(out), flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
