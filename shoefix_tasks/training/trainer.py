"""The SFT trainer a recipe gets: TRL's `SFTTrainer`, or, with `train.step_metrics: false`, one whose
loss on a packed batch reads nothing back from the card beyond what the model's forward itself reads.

Why: on a GPU a LoRA step of a small model is bound by the host launching kernels, not by the card
running them (docs/benchmarks.md, the 0.5B profile). The host only stays ahead while nothing reads a
value back from the card. TRL's `compute_loss` reads three per micro-batch (entropy, token accuracy and
the token count, each an `.item()`), right between forward and backward, so the card drains and then
idles while the host launches the backward. Without them the loss is the same sum over answer tokens
divided by the same count; only the two diagnostics are missing from the logged metrics (the loss,
learning rate and gradient norm stay). The token count is read off the packed row's shape, which the
host already knows (a padded batch's count still reads the card: packed recipes avoid it). Two reads stay, inside the libraries' forward: transformers checks a packed row's
positions, and TRL's fused LM head selects the labelled tokens. Everything else (evaluation, several
processes, other losses) is TRL's own path, and so is every TRL release this was not checked against:
the subclass restates the plain branch of TRL's `compute_loss`, which a new release may change.
Measured: docs/benchmarks.md.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# TRL releases whose SFTTrainer.compute_loss the sync-free step was checked against
# (tests/training/test_sync_free_trainer.py): other releases train with TRL's own step.
CHECKED_TRL = ("1.16.",)


def build_trainer(model, args, train_dataset, tokenizer, callbacks: list, step_metrics: bool = True):
    """TRL's SFTTrainer when `step_metrics` (or on an unchecked TRL release), else the sync-free subclass."""
    import trl
    from trl import SFTTrainer

    cls = SFTTrainer
    if not step_metrics:
        if trl.__version__.startswith(CHECKED_TRL):
            cls = _sync_free_class()
        else:
            log.warning("train.step_metrics: false was checked against TRL %s, not %s: training with TRL's own "
                        "step", "/".join(v + "x" for v in CHECKED_TRL), trl.__version__)
    return cls(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks)


def _sync_free_class():
    import torch
    from trl import SFTTrainer

    class SyncFreeSFTTrainer(SFTTrainer):
        """SFTTrainer whose training loss reads nothing back from the card (see the module docstring)."""

        def _sync_free(self, model) -> bool:
            """The one path this class replaces: a single process training with the plain answer-only NLL,
            asked for the loss alone (with outputs, TRL recomputes the logits)."""
            return (model.training and self.accelerator.num_processes == 1 and self.compute_loss_func is None
                    and self.label_smoother is None and self.args.loss_type == "nll" and not self.aux_loss_enabled)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not self._sync_free(model):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)  # TRL's fused LM head: log-probs of the labelled tokens
            count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
            self._total_train_tokens += _tokens_fed(inputs)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return SyncFreeSFTTrainer


def _tokens_fed(inputs: dict[str, Any]) -> int:
    """Tokens of this micro-batch, as TRL counts them: the packed row's length (known on the host), or,
    for a padded batch, the attention mask's sum (which does read the card: packed recipes avoid it)."""
    if "position_ids" in inputs and "attention_mask" not in inputs:
        return int(inputs["position_ids"].size(1))
    return int(inputs["attention_mask"].sum())
