"""Evaluation measures what production serves: with the default base (shipped as a GGUF) champion and
challenger answer through llama.cpp, the challenger as the base with its adapter merged in (the form
registration derives and serving loads), and the latency
measurement times those same engines. (Tiny Hugging Face test models stay on transformers: the other
evaluation tests.) The timed answers are stubbed, and 3 of the 5 fixture questions answered, only to
keep the test short on 2 shared cores; the answers that are scored are real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoefix_tasks.config import load_recipe
from shoefix_tasks.evaluation import evaluate as ev

pytest.importorskip("llama_cpp")


def test_default_base_evaluates_through_llama_cpp(shoefix_env, tmp_path_factory, tmp_path, monkeypatch, caplog):
    from shoefix_tasks.model.engines import LlamaCppEngine
    from tests.real_base import link_converted_base, lora_adapter

    link_converted_base(tmp_path_factory, shoefix_env)
    adapter = lora_adapter(shoefix_env, tmp_path / "adapter")[2]
    timed: list[tuple[str, str]] = []

    def fake_latency(engines, questions, max_new_tokens, repetition_penalty=1.0, warmup=1):
        timed.extend((type(e).__name__, e.label) for e in engines)
        return {e.label: {"p50_s": 1.0, "p95_s": 1.0, "tokens_per_s": 1.0, "n": 10, "times_s": [1.0]}
                for e in engines}

    monkeypatch.setattr(ev, "measure_latency_interleaved", fake_latency)
    real_items = ev.eval_items

    def two_and_guard(*args, **kwargs):  # 2 of the 4 fixture holdout questions, and the guard question
        items, guard_ids, digest = real_items(*args, **kwargs)
        return [it for it in items if it["id"] in guard_ids] + [it for it in items if it["id"] not in guard_ids][:2], \
            guard_ids, digest

    monkeypatch.setattr(ev, "eval_items", two_and_guard)
    recipe = load_recipe("default")
    caplog.set_level("INFO", logger="shoefix_tasks.model.engines")
    ref = ev.evaluate(shoefix_env, recipe, "llama-eval", adapter, None, "base", "train-x")
    result = json.loads(Path(ref["evaluation_path"]).read_text())

    assert timed == [(LlamaCppEngine.__name__, "base"), (LlamaCppEngine.__name__, "challenger")]
    champ, chall = result["champion"]["profile"], result["challenger"]["profile"]
    assert champ["engine"] == chall["engine"] == "llama.cpp"
    assert (champ["adapter"], chall["adapter"]) == ("base", "gguf-merged-q8_0")
    assert result["latency"]["compared"]  # a different file (Q8_0 projections): compared, not assumed equal
    for side in ("champion", "challenger"):
        assert all(s["answer"] and s["new_tokens"] > 0 for s in result[side]["scores"])
    assert result["champion"]["scores"][0]["answer"] != result["challenger"]["scores"][0]["answer"]

    # progress for each model (answers so far, rate, time left; every 8 answers and at the end: with 3
    # questions, the end), so that a minutes-long evaluation is not silent
    progress = [r.getMessage() for r in caplog.records if r.name == "shoefix_tasks.model.engines"
                and " answered, " in r.getMessage()]
    for label in ("base", "challenger"):
        assert any(m.startswith(f"{label}: 3/3 answered, ") and m.endswith(" answers/s, about 0 s left")
                   for m in progress), progress
