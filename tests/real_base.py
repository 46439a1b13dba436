"""The real default base (SmolLM2-135M-Instruct, shipped GGUF) for tests of what serves it: converted
once per test session (~20-50 s on 2 cores) and linked into each test's state folder, plus a LoRA
adapter on it with non-zero B (seeded), released with its manifest like a trained one."""

from __future__ import annotations

from pathlib import Path

from shoefix_tasks.config import Settings
from shoefix_tasks.model.base import SMOLLM2
from tests.conftest import session_folder


def link_converted_base(tmp_path_factory, settings: Settings) -> None:
    """`settings.model_cache/smollm2-135m-instruct` -> the session's one conversion."""
    from shoefix_tasks.model.base import convert_smollm2

    shared = session_folder(tmp_path_factory, "smollm2", lambda d: convert_smollm2(d / SMOLLM2)) / SMOLLM2
    settings.model_cache.mkdir(parents=True, exist_ok=True)
    link = settings.model_cache / SMOLLM2
    if not link.exists():
        link.symlink_to(shared, target_is_directory=True)


def lora_adapter(settings: Settings, folder: Path, seed: int = 14, r: int = 8, std: float = 0.02):
    """A rank-`r` LoRA on every projection of the base with B ~ N(0, std) (a fresh LoRA has B = 0 and
    changes nothing), saved with its tokenizer and manifest. Returns (peft model, tokenizer, folder)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from shoefix_tasks.model.adapter import write_manifest
    from shoefix_tasks.model.base import base_identity, load_base

    model, tok = load_base(SMOLLM2, settings)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    with torch.no_grad():
        for name, w in peft.named_parameters():
            if "lora_B" in name:
                w.normal_(0, std)
    peft.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_manifest(folder, base_identity(SMOLLM2, settings), {"recipe": "test"})
    return peft, tok, folder
