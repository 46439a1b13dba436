"""The registered PEFT LoRA in llama.cpp's terms (`lora_tensors`), and written as a GGUF adapter.

llama.cpp can apply such a file itself on the GGUF the base ships as (for the default, the very Q4_1 file
the trainer dequantized, so base weights are identical): y = W x + s * B (A x) with s = alpha / rank,
the adapter exact (fp32). Versions registered before the merge serve that way; registration now folds
the same tensors into the base (model/gguf_merge.py), which answers faster.

Two facts make the conversion right:
- llama.cpp's llama GGUF stores q and k projection rows permuted relative to Hugging Face (its rope
  pairs rows differently); transformers undoes this when it dequantizes the GGUF. The LoRA delta B @ A
  must land on the same rows as the weight, so lora_b of q and k gets the same row permutation.
- PEFT's lora_A.weight is (r, in) and lora_B.weight is (out, r) in row-major numpy; a GGUF tensor of
  numpy shape (r, in) has ggml ne = [in, r], which is what llama.cpp checks against the base weight
  (ne[0] = in features, ne[1] = out features).

The output is a pure function of the adapter's bytes and the base GGUF's architecture: tensors in a
fixed order, no timestamps, so converting the same adapter twice gives the same sha256.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from shoefix_tasks.records import sha256_file

FORMAT = "shoefix-gguf-adapter/1"
# Hugging Face projection name -> llama.cpp tensor name inside a block (blk.N.<name>.weight)
_MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_SUPPORTED_ARCH = ("llama",)  # the row permutation below is llama's; other architectures are refused


class UnsupportedAdapter(ValueError):
    """The adapter uses something the GGUF adapter cannot express (DoRA, biases, saved modules,
    per-module ranks, a target outside the seven projections); it is served by transformers instead."""


def base_reader(path: Path):
    """A GGUFReader of `path`, one per file per process: opening one parses every metadata field, the
    tokenizer's whole vocabulary included, which costs seconds; the tensors stay memory-mapped. Keyed by
    the resolved file's identity (device, inode, size, mtime, ctime), so a file replaced or rewritten is
    read again. The base GGUF's sha256 is checked against the trainer's record before any merge uses it."""
    real = path.resolve()
    st = real.stat()
    return _reader(str(real), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


def private_partial(out: Path) -> Path:
    """A fresh temporary name beside `out`, so two processes deriving the same file never write one file."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    return Path(name)


@functools.lru_cache(maxsize=2)
def _reader(path: str, identity: tuple[int, ...]):
    import gguf

    return gguf.GGUFReader(path)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The few base GGUF fields the conversion needs (architecture and head counts)."""
    import gguf

    reader = base_reader(path)

    def scalar(key: str):
        field = reader.fields.get(key)
        if field is None:
            return None
        value = field.parts[field.data[0]]
        return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]

    arch = scalar("general.architecture")
    return {"architecture": arch, "n_head": scalar(f"{arch}.attention.head_count"),
            "n_head_kv": scalar(f"{arch}.attention.head_count_kv") or scalar(f"{arch}.attention.head_count")}


def permute_rows(w, n_head: int):
    """Hugging Face -> llama.cpp row order of a q or k projection (or of its LoRA B): within each head
    the two rope halves are interleaved. Shape (n_head * head_dim, cols) is kept."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_config(cfg: dict[str, Any]) -> float:
    """The scaling llama.cpp must apply (alpha / r, or alpha / sqrt(r) with rsLoRA) as its `alpha`
    times r, after refusing what a GGUF LoRA cannot express."""
    problems = []
    if cfg.get("use_dora"):
        problems.append("DoRA")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']}")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("per-module rank or alpha")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out")
    if problems:
        raise UnsupportedAdapter(f"adapter uses {', '.join(problems)}: not expressible as a GGUF LoRA")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return scaling * r  # llama.cpp computes alpha / rank per tensor; rank = r here


def _gguf_name(key: str) -> tuple[int, str, str]:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> (3, 'attn_q', 'lora_a')."""
    parts = key.split(".")
    try:
        layer = int(parts[parts.index("layers") + 1])
        module, which = parts[-3], parts[-2]
        return layer, _MODULES[module], {"lora_A": "lora_a", "lora_B": "lora_b"}[which]
    except (ValueError, KeyError, IndexError) as err:
        raise UnsupportedAdapter(f"adapter tensor {key!r} is not a LoRA on a block's projection") from err


def float32_tensors(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors as float32 numpy arrays, bf16 included (an adapter trained with
    `lora.adapter_dtype: base` on a bf16 base), which safetensors' numpy loader refuses: numpy has no bf16,
    and a bf16 value is the top half of the float32 with the same bits (read here without importing torch).
    A file whose header does not fit it, or whose tensors do not fit their byte ranges, is refused."""
    import numpy as np

    layout = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
    if size < 2 or 8 + size > len(raw):
        raise UnsupportedAdapter(f"{path.name}: not a safetensors file (header length {size}, {len(raw)} bytes)")
    try:
        header = json.loads(raw[8:8 + size])
    except ValueError as err:
        raise UnsupportedAdapter(f"{path.name}: unreadable safetensors header: {err}") from err
    data = memoryview(raw)[8 + size:]
    out: dict[str, Any] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in layout:
            raise UnsupportedAdapter(f"adapter tensor {key!r} has dtype {dtype}: a LoRA is F32, F16, BF16 or F64")
        if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * layout[dtype].itemsize:
            raise UnsupportedAdapter(f"adapter tensor {key!r}: bytes {begin}..{end} do not hold a {dtype} {shape}")
        arr = np.frombuffer(data[begin:end], dtype=layout[dtype])
        arr = (arr.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else arr.astype(np.float32)
        out[key] = arr.reshape(shape)
    return out


def lora_tensors(adapter_dir: Path, base_gguf: Path) -> dict[str, Any]:
    """The verified adapter in llama.cpp's terms, for the adapter file and for the merge (model/gguf_merge):
    {"alpha", "digest", "architecture", "tensors": {(layer, module, "lora_a"|"lora_b"): float32 array}},
    lora_b of q and k already in llama.cpp's row order. Refuses what a GGUF LoRA cannot express."""
    import numpy as np

    from shoefix_tasks.model.adapter import adapter_digest, verify_adapter

    manifest = verify_adapter(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    alpha = _check_config(cfg)
    meta = gguf_metadata(base_gguf)
    if meta["architecture"] not in _SUPPORTED_ARCH:
        raise UnsupportedAdapter(f"base architecture {meta['architecture']!r}: no GGUF adapter conversion")
    named: dict[tuple[int, str, str], Any] = {}
    for key, value in float32_tensors(adapter_dir / "adapter_model.safetensors").items():
        layer, module, which = _gguf_name(key)
        w = value
        if which == "lora_b" and module in ("attn_q", "attn_k"):
            w = permute_rows(w, meta["n_head"] if module == "attn_q" else meta["n_head_kv"])
        named[(layer, module, which)] = np.ascontiguousarray(w)
    if not named:
        raise UnsupportedAdapter(f"{adapter_dir} holds no LoRA tensors")
    return {"alpha": alpha, "digest": adapter_digest(manifest), "architecture": meta["architecture"],
            "tensors": named}


def write_adapter_gguf(adapter_dir: Path, base_gguf: Path, out: Path) -> dict[str, Any]:
    """Write `adapter_dir` (a verified PEFT LoRA) as a llama.cpp adapter GGUF at `out` (atomically).
    Returns {"sha256", "bytes", "tensors", "alpha"}."""
    import gguf

    lora = lora_tensors(adapter_dir, base_gguf)
    tmp = private_partial(out)
    writer = gguf.GGUFWriter(str(tmp), lora["architecture"])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora["alpha"])
    # provenance: which adapter and which base this file belongs to
    writer.add_string("shoefix.format", FORMAT)
    writer.add_string("shoefix.adapter_digest", lora["digest"])
    writer.add_string("shoefix.base_gguf_sha256", sha256_file(base_gguf))
    for (layer, module, which), w in sorted(lora["tensors"].items()):
        writer.add_tensor(f"blk.{layer}.{module}.weight.{which}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return {"sha256": sha256_file(out), "bytes": out.stat().st_size, "tensors": len(lora["tensors"]),
            "alpha": lora["alpha"]}
