"""The served forms of the default base in llama.cpp, checked against transformers + PEFT (the trainer's
view of the same adapter) on the real base: the shipped Q4_1 GGUF with our LoRA merged in (Q8_0
projections: what registration derives now), and the same GGUF + the LoRA as a GGUF adapter (versions
registered before the merge).

The Q4_1 base itself differs from its dequantized copy in llama.cpp (llama.cpp multiplies Q4_1 weights
with 8-bit-quantized activations; transformers with fp32 ones), so the comparisons are:
- exact: the same base dequantized to an F32 GGUF, so any error is the adapter conversion's (a wrong
  q/k row permutation gives ~40x the error, checked too);
- served: the real files, whose error with the adapter must stay well below the adapter's own effect,
  while a merge back into Q4_1 (which rounds the delta away) must not.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from shoefix_tasks.config import Settings
from shoefix_tasks.model import gguf_adapter
from shoefix_tasks.model.base import SMOLLM2, smollm2_gguf_path

pytest.importorskip("llama_cpp")
QUESTION = "How do I keep leather boots free of mold in a humid closet?"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Settings with the converted default base, a rank-8 LoRA on every projection with non-zero B
    (seeded) and its manifest, and transformers' last-position logits for base and base + adapter."""
    import torch

    from shoefix_tasks.model.generation import Answerer, _encode
    from tests.real_base import link_converted_base, lora_adapter

    tmp = tmp_path_factory.mktemp("engines")
    settings = dataclasses.replace(Settings.from_env(), home=tmp / "home")
    link_converted_base(tmp_path_factory, settings)
    peft, tok, adapter = lora_adapter(settings, tmp / "adapter")
    tok.padding_side = "left"
    enc = _encode(Answerer(peft, tok, "adapted"), [QUESTION])
    with torch.no_grad():
        adapted_logits = peft(**enc).logits[0, -1].numpy()
        with peft.disable_adapter():
            base_logits = peft(**enc).logits[0, -1].numpy()
        greedy = peft.merge_and_unload().generate(**enc, max_new_tokens=12, do_sample=False,
                                                  pad_token_id=tok.pad_token_id)
    return {"settings": settings, "adapter": adapter, "tmp": tmp, "base": base_logits, "adapted": adapted_logits,
            "prompt_ids": enc["input_ids"][0].tolist(),
            "greedy": greedy[0, enc["input_ids"].shape[1]:].tolist()}


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The GGUF with every tensor dequantized to F32 (same metadata, same llama.cpp row order)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def last_logits(engine) -> np.ndarray:
    engine.llm.reset()
    engine.llm.eval(engine._tokens(QUESTION))
    return np.ctypeslib.as_array(engine.llm._ctx.get_logits_ith(-1), shape=(engine._n_vocab,)).copy()


def test_prompt_is_the_transformers_chat_template(real):
    from shoefix_tasks.model.engines import LlamaCppEngine

    engine = LlamaCppEngine(smollm2_gguf_path(), None, 1.0, "base", threads=2)
    assert engine._tokens(QUESTION) == real["prompt_ids"]
    engine.close()


def test_adapter_gguf_and_f32_merge_equal_peft_on_an_f32_base(real, monkeypatch):
    from shoefix_tasks.model.engines import LlamaCppEngine
    from shoefix_tasks.model.gguf_merge import write_merged_gguf

    tmp = real["tmp"]
    f32 = dequantized_copy(smollm2_gguf_path(), tmp / "base-f32.gguf")
    good = gguf_adapter.write_adapter_gguf(real["adapter"], f32, tmp / "good.gguf")
    assert good["tensors"] == 30 * 7 * 2 and good["alpha"] == 16.0
    monkeypatch.setattr(gguf_adapter, "permute_rows", lambda w, n_head: w)  # the mistake the permutation avoids
    gguf_adapter.write_adapter_gguf(real["adapter"], f32, tmp / "unpermuted.gguf")
    monkeypatch.undo()

    # the served merge's arithmetic, exact in F32 (the served file rounds the same sums to Q8_0)
    write_merged_gguf(f32, real["adapter"], tmp / "merged-f32.gguf", "F32")

    errors = {}
    for name in ("none", "good", "unpermuted", "merged-f32"):
        if name == "merged-f32":
            engine = LlamaCppEngine(tmp / "merged-f32.gguf", None, 1.0, name, threads=2)
        else:
            engine = LlamaCppEngine(f32, None if name == "none" else tmp / f"{name}.gguf", 1.0, name, threads=2)
        want = real["base"] if name == "none" else real["adapted"]
        errors[name] = float(np.abs(last_logits(engine) - want).mean())
        engine.close()
    effect = float(np.abs(real["adapted"] - real["base"]).mean())
    # measured: base 0.005, adapter 0.002-0.01 against an effect of ~0.3; unpermuted ~0.2
    assert errors["none"] < 0.02 and errors["good"] < 0.02 and errors["merged-f32"] < 0.02, errors
    assert errors["good"] < effect / 40 and errors["merged-f32"] < effect / 40, (errors, effect)
    assert errors["unpermuted"] > 10 * errors["good"], errors


def test_served_forms_agree_with_transformers(real):
    """Both served forms pick transformers + PEFT's first greedy tokens, with logits far closer to the
    adapted model than the adapter's own effect; merging back into the base's Q4_1 fails that (the
    delta rounds away), which is why the served merge uses Q8_0."""
    from shoefix_tasks.model.engines import (
        FORM_LORA,
        FORM_MERGED,
        LlamaCppEngine,
        open_engine,
    )
    from shoefix_tasks.model.gguf_merge import write_merged_gguf

    settings = real["settings"]
    base = open_engine(SMOLLM2, None, settings, label="base")
    merged = open_engine(SMOLLM2, real["adapter"], settings, label="served")
    lora = open_engine(SMOLLM2, real["adapter"], settings, label="lora", served_form=FORM_LORA)
    assert (merged.form, merged.adapter_gguf, lora.form) == (FORM_MERGED, None, FORM_LORA)
    q41 = real["tmp"] / "merged-q4_1.gguf"
    write_merged_gguf(smollm2_gguf_path(), real["adapter"], q41, "Q4_1")
    rounded = LlamaCppEngine(q41, None, 1.0, "q4_1", threads=2)
    logits = {e.label: last_logits(e) for e in (base, merged, lora, rounded)}
    to_adapted = {k: float(np.abs(v - real["adapted"]).mean()) for k, v in logits.items()}
    to_base = {k: float(np.abs(v - real["base"]).mean()) for k, v in logits.items()}
    # measured (mean |logit error|): to the adapted logits base 0.36, served merge 0.18, runtime LoRA 0.18,
    # merge into Q4_1 0.32; to the base's logits that Q4_1 merge 0.16. An adapted engine sits much nearer
    # transformers' adapted model than the base does; the merge into Q4_1 sits nearer the base.
    for k in ("served", "lora"):
        assert to_adapted[k] < to_adapted["base"] / 1.5, (k, to_adapted)
    assert to_base["q4_1"] < to_adapted["q4_1"] / 1.5, (to_adapted, to_base)
    for engine in (merged, lora):
        logits = last_logits(engine)
        assert int(np.argmax(logits)) == int(np.argmax(real["adapted"])), engine.label
        ids = list(engine._generate(QUESTION, 12))
        assert ids[:6] == real["greedy"][:6], (engine.label, ids, real["greedy"])
    text = merged.answer(QUESTION, 24)
    assert "".join(merged.stream(QUESTION, 24)).strip() == text and text
    for e in (base, merged, lora, rounded):
        e.close()


def test_the_served_merge_is_deterministic_and_its_cache_is_checked(real):
    """Evaluation derives the served file from the adapter; the same adapter gives the same bytes, and a
    cached file altered after its derivation is derived again, never opened."""
    from shoefix_tasks.model.engines import served_gguf_for
    from shoefix_tasks.model.gguf_merge import write_merged_gguf
    from shoefix_tasks.records import sha256_file

    tmp, settings = real["tmp"], real["settings"]
    cached = served_gguf_for(real["adapter"], smollm2_gguf_path(), settings)
    info = write_merged_gguf(smollm2_gguf_path(), real["adapter"], tmp / "merged-again.gguf")
    assert info["merged"] == 30 * 7 and (tmp / "merged-again.gguf").read_bytes() == cached.read_bytes()

    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x01
    cached.write_bytes(bytes(data))
    again = served_gguf_for(real["adapter"], smollm2_gguf_path(), settings)
    assert again == cached and sha256_file(again) == info["sha256"]


def test_a_cached_system_prompt_gives_the_answer_a_fresh_context_gives(real):
    """The engine keeps the system prompt's keys and values and computes only the question's tokens: a
    question's answer must be bit for bit the same fresh, after another question, and asked twice."""
    from shoefix_tasks.model.engines import open_engine

    other = "Can I put wet trainers on a radiator to dry them?"
    served = open_engine(SMOLLM2, real["adapter"], real["settings"], label="served")

    def logits_after_prime() -> np.ndarray:
        served._prime(served._tokens(QUESTION))
        return np.ctypeslib.as_array(served.llm._ctx.get_logits_ith(-1), shape=(served._n_vocab,)).copy()

    with served._lock:
        served.llm.reset()
        fresh_logits = logits_after_prime()
        fresh = list(served._generate(QUESTION, 24))
        list(served._generate(other, 4))
        evaluated, full = [], served.llm.eval
        served.llm.eval = lambda tokens: (evaluated.append(len(tokens)), full(tokens))
        cached_logits = logits_after_prime()
        served.llm.eval = full
        again = list(served._generate(QUESTION, 24))
        twice = list(served._generate(QUESTION, 24))  # the whole prompt was cached this time
    n_prompt = len(served._tokens(QUESTION))
    assert len(served._prefix) > 20 and evaluated == [n_prompt - len(served._prefix)], (evaluated, n_prompt)
    assert np.array_equal(cached_logits, fresh_logits)
    assert again == fresh == twice
    served.close()


def test_two_llama_engines_answer_side_by_side_as_they_answer_alone(real, monkeypatch):
    """Evaluation's champion and challenger answer at the same time, one thread each; the answers are the
    ones each gives alone."""
    import threading

    from shoefix_tasks.model import engines

    monkeypatch.setenv("SHOEFIX_INFERENCE_THREADS", "1")
    pair = [engines.open_engine(SMOLLM2, None, real["settings"], label="base"),
            engines.open_engine(SMOLLM2, real["adapter"], real["settings"], label="served")]
    questions = [QUESTION, "Can I put wet trainers on a radiator to dry them?"]
    alone = {e.label: [g["answer"] for g in e.answer_many(questions, 16)] for e in pair}
    where: dict[str, str] = {}
    for e in pair:
        answer_many = e.answer_many
        monkeypatch.setattr(e, "answer_many", lambda q, n, _e=e, _f=answer_many: (
            where.__setitem__(_e.label, threading.current_thread().name), _f(q, n))[1])
    together = engines.answer_each(pair, questions, 16)
    assert {k: [g["answer"] for g in v] for k, v in together.items()} == alone
    assert all(name.startswith("shoefix-answer") for name in where.values()) and len(where) == 2, where
    for e in pair:
        e.close()


def test_conversion_is_deterministic(real):
    tmp = real["tmp"]
    a = gguf_adapter.write_adapter_gguf(real["adapter"], smollm2_gguf_path(), tmp / "a.gguf")
    b = gguf_adapter.write_adapter_gguf(real["adapter"], smollm2_gguf_path(), tmp / "b.gguf")
    assert a == b and (tmp / "a.gguf").read_bytes() == (tmp / "b.gguf").read_bytes()


def test_engine_choice(tiny_model):
    from shoefix_tasks.model.engines import choose_engine

    assert choose_engine(SMOLLM2) == "llama.cpp"
    assert choose_engine(str(tiny_model)) == "transformers"
    assert choose_engine(SMOLLM2, "transformers") == "transformers"
    with pytest.raises(ValueError):
        choose_engine(SMOLLM2, "onnx")


@pytest.mark.parametrize("cfg", [{"use_dora": True}, {"bias": "all"}, {"modules_to_save": ["lm_head"]},
                                 {"rank_pattern": {"q_proj": 4}}])
def test_what_a_gguf_lora_cannot_express_is_refused(cfg):
    with pytest.raises(gguf_adapter.UnsupportedAdapter):
        gguf_adapter._check_config({"r": 8, "lora_alpha": 16, **cfg})
    assert gguf_adapter._check_config({"r": 16, "lora_alpha": 32, "use_rslora": True}) == pytest.approx(32 * 4)


def test_transformers_engine_streams_its_answer(shoefix_env, tiny_model):
    from shoefix_tasks.model.engines import open_engine

    engine = open_engine(str(tiny_model), None, shoefix_env, repetition_penalty=1.15)
    assert engine.name == "transformers"
    question = "What humidity lets mold grow in stored shoes?"
    assert "".join(engine.stream(question, 16)).strip() == engine.answer(question, 16)
    many = engine.answer_many([question, "How do I dry boots?"], 8)
    assert [set(m) for m in many] == [{"answer", "new_tokens", "batch_seconds"}] * 2
    engine.close()


def test_a_stream_closed_early_stops_generating_before_the_next_answer(shoefix_env, tiny_model):
    """The server closes a stream when its reader leaves or the safety net stops it: the generation thread
    must be gone before the engine answers again (never two generations on one model at once)."""
    import threading

    from shoefix_tasks.model.engines import open_engine

    engine = open_engine(str(tiny_model), None, shoefix_env)
    pieces = engine.stream("What humidity lets mold grow in stored shoes?", 200)
    next(pieces)
    pieces.close()
    assert not [t for t in threading.enumerate() if t.name == "shoefix-generate"]
    assert engine.answer_many(["How do I dry boots?"], 4)[0]["new_tokens"] > 0  # the engine answers again
    engine.close()


def test_adapter_tensors_are_read_as_float32_whatever_they_were_saved_in(tmp_path):
    """An adapter saved in bf16 (`lora.adapter_dtype: base`), fp16, fp32 or fp64, with PEFT's metadata and
    mixed dtypes in one file, reads back as the float32 values torch holds; a tensor that is no LoRA's
    (integers) and a file cut short or lying about its sizes are refused as adapters, not crashes."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = torch.randn(8, 64)
    tensors = {"bf16": ref.to(torch.bfloat16), "f16": ref[:3, :5].to(torch.float16).contiguous(),
               "f32": ref[:2], "f64": ref[1:4].double(), "empty": torch.zeros(0, 64)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    got = gguf_adapter.float32_tensors(tmp_path / "a.safetensors")
    assert set(got) == set(tensors)
    for key, want in tensors.items():
        assert got[key].dtype == np.float32 and got[key].shape == tuple(want.shape), key
        assert np.array_equal(got[key], want.float().numpy()), key

    save_file({"a": torch.arange(4)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(gguf_adapter.UnsupportedAdapter, match="I64"):
        gguf_adapter.float32_tensors(tmp_path / "int.safetensors")
    whole = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:-40])  # the last tensor's bytes run past the end
    with pytest.raises(gguf_adapter.UnsupportedAdapter, match="do not hold"):
        gguf_adapter.float32_tensors(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(whole[:20])  # the header itself cut short
    with pytest.raises(gguf_adapter.UnsupportedAdapter, match="not a safetensors file"):
        gguf_adapter.float32_tensors(tmp_path / "head.safetensors")
