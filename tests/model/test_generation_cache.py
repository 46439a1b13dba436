"""The static-KV-cache generation path (single answers on a GPU) gives the same greedy answers as the
dynamic path, on the tiny model on the CPU; batches and answers that do not fit keep the dynamic cache."""

from __future__ import annotations

import re

import pytest

from shoefix_tasks.model.generation import _cache_kwargs, _encode, generate, load_answerer, measure_latency

QUESTIONS = ["What humidity lets mold grow in stored shoes?", "How do I dry wet leather boots safely?"]


@pytest.fixture()
def answerer(shoefix_env, tiny_model):
    ans = load_answerer(str(tiny_model), None, shoefix_env)
    assert ans.static_cache_len == 0  # no GPU here: the product path stays dynamic on a CPU
    return ans


def test_static_cache_gives_the_dynamic_greedy_tokens(answerer):
    import torch
    from transformers import StaticCache

    ans = answerer
    dynamic = [generate(ans, [q], 40, 1, repetition_penalty=1.15)[0] for q in QUESTIONS]
    ans.static_cache_len = 128
    static = [generate(ans, [q], 40, 1, repetition_penalty=1.15)[0] for q in QUESTIONS]
    assert [d["answer"] for d in dynamic] == [s["answer"] for s in static]
    assert all(s["new_tokens"] > 0 for s in static)

    # the static path really used a StaticCache, and the token ids (not only the text) agree
    enc = _encode(ans, QUESTIONS[:1])
    kw = _cache_kwargs(ans, enc, 40)
    assert kw == {"cache_implementation": "static", "max_cache_len": 128}
    with torch.inference_mode():
        out_s = ans.model.generate(**enc, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                   pad_token_id=ans.tokenizer.pad_token_id, return_dict_in_generate=True, **kw)
        out_d = ans.model.generate(**enc, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                   pad_token_id=ans.tokenizer.pad_token_id)
    assert isinstance(out_s.past_key_values, StaticCache)
    assert torch.equal(out_s.sequences, out_d)


def test_cache_choice(answerer):
    ans = answerer
    ans.static_cache_len = 64
    one = _encode(ans, QUESTIONS[:1])
    prompt_len = one["input_ids"].shape[1]
    assert _cache_kwargs(ans, one, 64 - prompt_len)["cache_implementation"] == "static"
    assert _cache_kwargs(ans, one, 65 - prompt_len) == {"cache_implementation": "dynamic"}  # would not fit
    assert _cache_kwargs(ans, _encode(ans, QUESTIONS), 8) == {"cache_implementation": "dynamic"}  # a batch
    # an answer too long for the cache still comes back, through the dynamic cache
    assert generate(ans, QUESTIONS[:1], 80 - prompt_len, 1)[0]["new_tokens"] > 0


def test_measure_latency_static_path(answerer):
    ans = answerer
    ans.static_cache_len = 128
    lat = measure_latency(ans, QUESTIONS, 16, repetition_penalty=1.15)
    assert lat["n"] == 2 and 0 < lat["p50_s"] <= lat["p95_s"]
    assert lat["tokens_per_s"] == pytest.approx(16 / lat["p50_s"], rel=1e-2)


def test_progress_is_logged_after_every_batch(answerer, caplog):
    """On a CPU an evaluation answers for minutes: each batch logs answers so far, rate and time left."""
    caplog.set_level("INFO", logger="shoefix_tasks.model.generation")
    generate(answerer, [*QUESTIONS, "Why do insoles smell?"], 4, 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "shoefix_tasks.model.generation"]
    pattern = re.compile(r"base: (\d)/3 answered, (\d+\.\d\d) answers/s, about (\d+) s left")
    found = [pattern.fullmatch(m) for m in lines]
    assert all(found) and [m.group(1) for m in found] == ["2", "3"], lines
    assert float(found[0].group(2)) > 0 and found[-1].group(3) == "0"
