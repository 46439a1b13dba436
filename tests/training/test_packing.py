"""Padding-free (packed) training, on the CPU: the GPU recipes load, packed batches keep examples apart
(positions restart, prompts carry no loss) and `shoefix_varlen` attention gives exactly the loss of the
examples run one by one. The CUDA kernel itself runs in benchmarks/gpu_train_throughput.py on an H200;
here the same function takes its CPU branch (one causal sdpa per example)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoefix_tasks.config import VARLEN_ATTN, load_recipe
from shoefix_tasks.training.factories import build_dataset, build_sft_config
from tests.conftest import FIXTURES, fixture_snapshot

GPU_RECIPES = ("qwen2.5-0.5b-gpu", "qwen2.5-1.5b-gpu", "qlora-gpu")


def _cpu_overrides(tiny_model: Path) -> list[str]:
    # the GPU recipe as is, except what a CPU cannot run (fused CUDA AdamW, 4-bit, bf16) and a short max_length
    return [f"model.base_model={tiny_model}", "model.dtype=float32", "quant.load_in_4bit=false",
            "train.optim=adamw_torch", "train.mixed_precision='no'", "train.max_length=512",
            "train.per_device_train_batch_size=2", "train.num_train_epochs=1", "train.save_steps=1000"]


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipes_pack_with_varlen_attention(name, tmp_path):
    r = load_recipe(name)
    assert r.model.attn_implementation == VARLEN_ATTN and r.model.dtype == "bfloat16"
    assert r.train.packing and not r.train.gradient_checkpointing and r.train.optim == "adamw_torch_fused"
    assert r.quant.load_in_4bit == (name == "qlora-gpu")
    assert not r.train.step_metrics  # nothing read back from the card mid-step (training/trainer.py)
    args = build_sft_config(r.train, tmp_path, cuda=False, bf16_supported=False)  # a CPU builds no CUDA config
    assert args.packing and args.packing_strategy == "bfd" and args.completion_only_loss
    assert args.per_device_train_batch_size == 16 and args.max_length == 1024
    # varlen attention never masks padding: a padded (unpacked) recipe with it is refused
    with pytest.raises(ValueError, match="needs train.packing"):
        load_recipe(name, ["train.packing=false"])


@pytest.fixture()
def packed_trainer(shoefix_env, tiny_model, tmp_path):
    """SFTTrainer built exactly as shoefix_tasks.training.train builds it, from the 0.5B GPU recipe, on the tiny model."""
    from peft import get_peft_model
    from trl import SFTTrainer

    from shoefix_tasks.config import Settings
    from shoefix_tasks.model.base import load_base
    from shoefix_tasks.records import read_jsonl
    from shoefix_tasks.training.factories import build_lora_config

    recipe = load_recipe("qwen2.5-0.5b-gpu", _cpu_overrides(tiny_model))
    settings = Settings.from_env()
    model, tok = load_base(recipe.model.base_model, settings, recipe.model.dtype, recipe.quant,
                           recipe.model.attn_implementation)
    assert model.config._attn_implementation == VARLEN_ATTN
    model = get_peft_model(model, build_lora_config(recipe.lora))
    rows = read_jsonl(FIXTURES / "corpus_small.jsonl")
    trainer = SFTTrainer(model=model, args=build_sft_config(recipe.train, tmp_path / "out", False, False),
                         train_dataset=build_dataset(rows, recipe), processing_class=tok)
    return trainer, tok, [r for r in rows if r["lang"] == "en"]


def _segments(batch) -> list[tuple[int, int]]:
    cu = batch["cu_seq_lens_q"].tolist()
    return list(zip(cu[:-1], cu[1:], strict=True))


def test_packed_batch_restarts_positions_and_masks_prompts(packed_trainer):
    trainer, tok, rows = packed_trainer
    assert trainer.padding_free
    batch = next(iter(trainer.get_train_dataloader()))
    ids, pos, labels = batch["input_ids"][0], batch["position_ids"][0], batch["labels"][0]
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flat row, no pad tokens
    segs = _segments(batch)
    assert len(segs) >= 3 and segs[-1][1] == ids.numel()  # several examples packed, all tokens real
    answers = [r["answer"] for r in rows]
    for s, e in segs:
        assert pos[s:e].tolist() == list(range(e - s))  # positions restart at every example
        trained = (labels[s:e] != -100).nonzero().flatten()
        first = int(trained[0])
        assert trained.tolist() == list(range(first, e - s))  # loss on one contiguous tail only
        prompt = tok.decode(ids[s:s + first])
        answer = tok.decode(ids[s + first:e], skip_special_tokens=True).strip()
        assert "ShoeFix" in prompt and "user" in prompt  # system prompt and question carry no loss
        assert answer in answers  # ... the answer does, whole
        assert labels[s] == -100  # never predict an example's first token from the one packed before it


def _token_nll(model, **inputs) -> float:
    """Sum of per-token NLL over labelled positions (next-token shift), in float64."""
    import torch
    import torch.nn.functional as F

    labels = inputs.pop("labels")
    with torch.no_grad():
        # use_cache=False as in training (TRL sets it): with a cache, transformers does not look for packed
        # sequences in position_ids, and sdpa would attend across the examples
        logits = model(**inputs, use_cache=False).logits.double()
    return float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"))


def test_packed_varlen_loss_equals_unpacked(packed_trainer, tiny_model):
    """The packed row through shoefix_varlen = each example alone; without the boundaries it is not."""
    import torch
    from transformers import AutoModelForCausalLM

    trainer, _, _ = packed_trainer
    model = trainer.model.eval()
    with torch.no_grad():  # give LoRA B non-zero weights so the adapter takes part too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    packed = _token_nll(model, **{k: v for k, v in batch.items() if k != "seq_idx"})

    alone = 0.0
    for s, e in _segments(batch):
        alone += _token_nll(model, input_ids=batch["input_ids"][:, s:e], labels=batch["labels"][:, s:e])
    assert packed == pytest.approx(alone, rel=1e-6)

    # transformers' own sdpa, given only the restarting position_ids, builds the dense block-diagonal mask:
    # same loss (the correct but slow path that shoefix_varlen replaces)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    merged = {n.replace("base_model.model.", ""): p for n, p in model.merge_and_unload().state_dict().items()}
    sdpa.load_state_dict(merged)
    assert _token_nll(sdpa, input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      labels=batch["labels"]) == pytest.approx(alone, rel=1e-6)
    # negative control: one long causal sequence lets examples attend to the ones packed before them
    crossed = _token_nll(sdpa, input_ids=batch["input_ids"], labels=batch["labels"])
    assert abs(crossed - alone) > 1e-4 * alone  # ~6e-4 on this random model; the equalities hold to 1e-6


def test_varlen_attention_refuses_padded_batches(packed_trainer):
    import torch

    trainer, _, _ = packed_trainer
    with pytest.raises(ValueError, match="packed"):
        trainer.model(input_ids=torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.tensor([[0, 1, 1, 1]]))


@pytest.mark.slow
def test_train_cli_path_with_gpu_recipe_on_cpu(shoefix_env, tiny_model, tmp_path):
    """shoefix_tasks.training.train with a packed GPU recipe: the adapter trains (LoRA B moves) on the CPU branch."""
    from safetensors.torch import load_file

    from shoefix_tasks.config import recipe_from_dict
    from shoefix_tasks.training.train import train

    s = shoefix_env
    snap = fixture_snapshot(s, "p1")
    recipe = load_recipe("qwen2.5-0.5b-gpu", [*_cpu_overrides(tiny_model), "train.learning_rate=5e-3"])
    recipe = recipe_from_dict("packed-cpu", recipe.to_dict() | {"name": "packed-cpu"})
    out = train(recipe, snap, s.home / "runs" / "p1", "p1", s)
    weights = load_file(f"{out['adapter_dir']}/adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert out["final_loss"] > 0 and json.loads((s.home / "runs" / "p1" / "train_result.json").read_text())
