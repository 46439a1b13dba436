"""`train.step_metrics: false` (shoefix_tasks.training.trainer): the same loss and gradients as TRL's
own step, on a packed batch of the tiny model, without reading a single value back from the device.
On a GPU that read is what makes the host wait for the card (docs/benchmarks.md); here a counter on
every tensor-to-Python conversion stands in for it. The model's own forward reads a few (transformers
checks a packed row's positions; on the CPU the attention splits the row at its boundaries): our step
must read exactly those and nothing more, TRL's step reads more."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from shoefix_tasks.config import load_recipe
from shoefix_tasks.training.factories import build_dataset, build_lora_config, build_sft_config
from shoefix_tasks.training.trainer import build_trainer
from tests.conftest import FIXTURES
from tests.training.test_packing import _cpu_overrides

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_reads():
    """Count every conversion of a tensor's value to Python, and every copy to the host, while inside
    (not boolean-mask indexing, which reads on a GPU only)."""
    seen: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name):
        def read(self, *a, **k):
            seen.append(name)
            return saved[name](self, *a, **k)
        return read

    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _trainer(tiny_model, tmp_path, step_metrics: bool, extra=()):
    from peft import get_peft_model

    from shoefix_tasks.config import Settings
    from shoefix_tasks.model.base import load_base
    from shoefix_tasks.records import read_jsonl

    recipe = load_recipe("qwen2.5-0.5b-gpu", [*_cpu_overrides(tiny_model), f"train.step_metrics={step_metrics}",
                                              *extra])
    model, tok = load_base(recipe.model.base_model, Settings.from_env(), recipe.model.dtype, recipe.quant,
                           recipe.model.attn_implementation)
    torch.manual_seed(0)  # the same LoRA weights in both trainers
    model = get_peft_model(model, build_lora_config(recipe.lora))
    for name, p in model.named_parameters():  # B starts at zero, which would make every A gradient zero
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    args = build_sft_config(recipe.train, tmp_path / f"out-{step_metrics}", False, False)
    dataset = build_dataset(read_jsonl(FIXTURES / "corpus_small.jsonl"), recipe)
    return build_trainer(model, args, dataset, tok, [], recipe.train.step_metrics)


def _loss_and_grads(trainer, batch, num_items=None):
    trainer.model.train()
    trainer.model.zero_grad()
    with counting_reads() as reads:
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, reads


@pytest.mark.parametrize("num_items", [None, 37])  # 37: a count over several accumulated micro-batches
def test_sync_free_step_trains_trls_loss_without_reading_the_device(shoefix_env, tiny_model, tmp_path, num_items):
    trl_trainer = _trainer(tiny_model, tmp_path, True)
    ours = _trainer(tiny_model, tmp_path, False)
    assert type(trl_trainer).__name__ == "SFTTrainer" and type(ours).__name__ == "SyncFreeSFTTrainer"
    batch = next(iter(trl_trainer.get_train_dataloader()))
    assert "attention_mask" not in batch  # a packed row
    n = None if num_items is None else torch.tensor(num_items)
    trl_loss, trl_grads, trl_reads = _loss_and_grads(trl_trainer, batch, n)
    loss, grads, reads = _loss_and_grads(ours, batch, n)

    ours.model.train()
    with counting_reads() as forward_reads, torch.no_grad():
        ours.model(**dict(batch), fused_lm_head=True)
    assert reads == forward_reads
    assert len(trl_reads) >= len(forward_reads) + 3  # entropy, accuracy, token count
    assert torch.allclose(loss, trl_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == trl_grads.keys() and len(grads) > 0
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)  # A is compared too, not zeros
    for name, g in grads.items():
        assert torch.allclose(g, trl_grads[name], rtol=1e-5, atol=1e-7), name
    # the same token count; the two diagnostics are TRL's only
    assert ours._metrics["train"]["num_tokens"] == trl_trainer._metrics["train"]["num_tokens"] == [batch["input_ids"].numel()]
    assert {"entropy", "mean_token_accuracy"} <= set(trl_trainer._metrics["train"])
    assert not {"entropy", "mean_token_accuracy"} & set(ours._metrics["train"])


def test_sync_free_trainer_leaves_evaluation_to_trl(shoefix_env, tiny_model, tmp_path):
    ours = _trainer(tiny_model, tmp_path, False)
    batch = next(iter(ours.get_train_dataloader()))
    ours.model.eval()
    with torch.no_grad():
        ours.compute_loss(ours.model, dict(batch))
    assert "mean_token_accuracy" in ours._metrics["eval"]  # TRL's path, metrics and all


def test_step_metrics_off_drops_the_nan_filter_and_blocking_copies(tmp_path):
    on = load_recipe("qwen2.5-0.5b-gpu", ["train.step_metrics=true"]).train
    off = load_recipe("qwen2.5-0.5b-gpu").train  # the GPU recipes train without them
    args_on = build_sft_config(on, tmp_path, cuda=False, bf16_supported=False)
    args_off = build_sft_config(off, tmp_path, cuda=False, bf16_supported=False)
    assert args_on.logging_nan_inf_filter and not args_off.logging_nan_inf_filter
    # copying a batch to the card without waiting needs a card: a CPU run keeps blocking copies
    assert not args_on.accelerator_config.non_blocking and not args_off.accelerator_config.non_blocking
    gpu = [dataclasses.replace(t, mixed_precision="no") for t in (on, off)]  # a CUDA config, built on this CPU
    gpu_on, gpu_off = (build_sft_config(t, tmp_path, cuda=True, bf16_supported=False) for t in gpu)
    assert not gpu_on.accelerator_config.non_blocking and gpu_off.accelerator_config.non_blocking
    assert gpu_off.dataloader_pin_memory  # non-blocking copies come from pinned memory


def test_other_losses_and_unchecked_trl_releases_train_with_trls_step(shoefix_env, tiny_model, tmp_path, monkeypatch):
    ours = _trainer(tiny_model, tmp_path, False)
    batch = next(iter(ours.get_train_dataloader()))
    ours.model.train()
    monkeypatch.setattr(ours.args, "loss_type", "dft")  # a loss the sync-free step does not restate
    ours.compute_loss(ours.model, dict(batch))
    assert "mean_token_accuracy" in ours._metrics["train"]  # TRL's path ran

    import trl
    monkeypatch.setattr(trl, "__version__", "1.99.0")
    assert type(_trainer(tiny_model, tmp_path, False)).__name__ == "SFTTrainer"
