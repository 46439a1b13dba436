from __future__ import annotations

import pytest

from shoefix_tasks.config import list_recipes, load_recipe, recipe_from_dict


def test_seed_recipe_reproduces_the_seed():
    t = load_recipe("seed").train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs) == (8, 2, 13)
    assert t.learning_rate == 1.5e-5 and t.lr_scheduler_type == "cosine_with_restarts"
    assert (t.warmup_steps, t.optim, t.weight_decay, t.seed, t.packing) == (5, "adamw_8bit", 0.01, 8888, False)
    assert t.mixed_precision == "auto"


def test_default_recipe_and_overrides():
    r = load_recipe("default", ["train.learning_rate=3e-4", "eval.max_new_tokens=64"])
    assert r.train.learning_rate == pytest.approx(3e-4) and isinstance(r.train.learning_rate, float)
    assert r.eval.max_new_tokens == 64
    assert {"seed", "default"} <= set(list_recipes())


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match="unknown key"):
        recipe_from_dict("x", {"train": {"learning_rat": 1e-4}})
    with pytest.raises(ValueError, match="unknown recipe section"):
        recipe_from_dict("x", {"trian": {}})
    with pytest.raises(FileNotFoundError, match="known recipes"):
        load_recipe("nope")


def test_cross_field_checks():
    with pytest.raises(ValueError, match="QLoRA"):
        recipe_from_dict("x", {"quant": {"load_in_4bit": True}, "model": {"dtype": "float32"}})
    with pytest.raises(ValueError, match="languages"):
        recipe_from_dict("x", {"train": {"languages": ["fr"]}})
    with pytest.raises(ValueError, match="expected true/false"):
        recipe_from_dict("x", {"train": {"packing": "yes"}})
    with pytest.raises(ValueError, match="adapter_dtype must be"):
        recipe_from_dict("x", {"lora": {"adapter_dtype": "bf16"}})
    with pytest.raises(ValueError, match="4-bit"):  # PEFT keeps a 4-bit base's adapter in fp32
        recipe_from_dict("x", {"quant": {"load_in_4bit": True}, "model": {"dtype": "bfloat16"},
                               "lora": {"adapter_dtype": "base"}})
    with pytest.raises(ValueError, match="fp16"):
        recipe_from_dict("x", {"model": {"dtype": "float16"}, "lora": {"adapter_dtype": "base"}})
