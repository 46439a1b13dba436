"""A tiny real model really trains with TRL + PEFT: LoRA weights change, base weights do not."""

from __future__ import annotations

import pytest

from shoefix_tasks.config import load_recipe
from shoefix_tasks.model.adapter import verify_adapter
from shoefix_tasks.model.base import compute_identity
from shoefix_tasks.training.train import last_complete_checkpoint, train
from tests.conftest import fixture_snapshot


@pytest.mark.slow
def test_lora_changes_base_does_not(shoefix_env, tiny_model, tiny_recipe):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    s = shoefix_env
    snap = fixture_snapshot(s)
    before = compute_identity(tiny_model, "tiny")["sha256"]
    out = train(load_recipe(str(tiny_recipe)), snap, s.home / "runs" / "r1", "r1", s)

    adapter = verify_adapter(__import__("pathlib").Path(out["adapter_dir"]))
    assert adapter["base"]["sha256"] == before
    weights = load_file(f"{out['adapter_dir']}/adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it moved

    assert compute_identity(tiny_model, "tiny")["sha256"] == before  # base files untouched
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out["adapter_dir"])
    ref = dict(base.named_parameters())
    for name, p in peft.named_parameters():
        if "base_layer" in name:
            orig = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, ref[orig]), name
    assert last_complete_checkpoint(s.home / "runs" / "r1") is not None
    assert out["train_records"] == 12 and out["final_loss"] > 0


@pytest.mark.slow
def test_retry_resumes_same_mlflow_run(shoefix_env, tiny_model, tiny_recipe):
    """A second invocation for the same run key reuses the MLflow run and resumes from a checkpoint."""
    s = shoefix_env
    snap = fixture_snapshot(s)
    recipe = load_recipe(str(tiny_recipe))
    first = train(recipe, snap, s.home / "runs" / "r1", "r1", s)
    second = train(recipe, snap, s.home / "runs" / "r1", "r1", s)
    assert second["run_id"] == first["run_id"]
    assert second["resumed_from"] is not None


@pytest.mark.slow
@pytest.mark.parametrize(("adapter_dtype", "expected"), [("base", "bfloat16"), ("float32", "float32")])
def test_the_adapter_trains_in_the_dtype_the_recipe_asks_for(shoefix_env, tiny_model, tiny_recipe,
                                                               adapter_dtype, expected):
    """`lora.adapter_dtype: base` (the 0.5B GPU recipe) keeps the LoRA matrices in the base's bf16 through
    training and into the published adapter; PEFT's default upcasts them to fp32."""
    from safetensors.torch import load_file

    s = shoefix_env
    recipe = load_recipe(str(tiny_recipe), ["model.dtype=bfloat16", f"lora.adapter_dtype={adapter_dtype}",
                                            "train.max_steps=2"])
    out = train(recipe, fixture_snapshot(s), s.home / "runs" / adapter_dtype, adapter_dtype, s)
    weights = load_file(f"{out['adapter_dir']}/adapter_model.safetensors")
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    assert lora and {str(v.dtype).removeprefix("torch.") for v in lora.values()} == {expected}
    assert any(v.float().abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained
