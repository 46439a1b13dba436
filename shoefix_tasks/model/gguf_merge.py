"""The served form of an adapter for llama.cpp: the shipped base GGUF with the LoRA merged in.

llama.cpp applying a LoRA at run time adds four graph nodes to each of the 210 adapted projections for
every token (two small products, a scale, an add), and on a few cores each node ends at a thread barrier;
folding W' = W + s * B @ A into the weights once removes them. The changed projections are re-quantized,
and the type is the trade-off (docs/benchmarks.md has the figures):
- the base's own Q4_1 cannot hold a trained delta: most of it is smaller than half a grid step of weights
  that already sit on that grid, so it rounds straight back to W and the merged model answers as the base;
- Q8_0 holds it at about the base's speed: its rounding noise moves logits more than the runtime LoRA
  does, but its holdout scorecard is equivalent to transformers fp32 (measured against the gate's
  minimum effect), and evaluation scores this very file, so the gate judges what is served;
- F32 / F16 are exact or nearly so but two to four times the bytes to read per token.
The LoRA comes straight from the verified adapter folder, in llama.cpp's row order (model/gguf_adapter.py).
Untouched tensors (embeddings, norms) keep the base's bytes. The output is a pure function of the base GGUF
and the adapter (fixed order, no timestamps), so a retried registration derives the same sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoefix_tasks.records import sha256_file

FORMAT = "shoefix-gguf-merged/2"  # bump on any change to the bytes written (a cache key)
SERVED_TYPE = "Q8_0"  # the type of the merged projections in the served form (see above)


def write_merged_gguf(base_gguf: Path, adapter_dir: Path, out: Path, merged_type: str = SERVED_TYPE) -> dict[str, Any]:
    """Write base + the verified adapter in `adapter_dir` merged as one GGUF at `out` (atomically), the
    changed projections as `merged_type` (F32, F16, Q8_0, Q4_1). Returns {"sha256", "bytes", "merged"}.
    What the merge cannot do (a tensor type gguf cannot dequantize, shapes that do not fit) raises
    UnsupportedAdapter, as what a GGUF LoRA cannot express does: such a version serves with transformers."""
    import gguf

    from shoefix_tasks.model.gguf_adapter import UnsupportedAdapter, lora_tensors, private_partial

    lora = lora_tensors(adapter_dir, base_gguf)
    tmp = private_partial(out)
    try:
        merged = _write(base_gguf, lora, tmp, merged_type, adapter_dir)
    except (ValueError, NotImplementedError, ArithmeticError, getattr(gguf.quants, "QuantError", ValueError)) as err:
        tmp.unlink(missing_ok=True)
        raise UnsupportedAdapter(f"cannot merge {adapter_dir.name} into {base_gguf.name} as {merged_type}: {err}") \
            from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return {"sha256": sha256_file(out), "bytes": out.stat().st_size, "merged": merged}


_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_1": "MOSTLY_Q4_1"}


def _write(base_gguf: Path, lora: dict[str, Any], tmp: Path, merged_type: str, adapter_dir: Path) -> int:
    import gguf
    import numpy as np

    from shoefix_tasks.model.gguf_adapter import base_reader

    pairs: dict[str, dict[str, Any]] = {}
    for (layer, module, which), w in lora["tensors"].items():
        pairs.setdefault(f"blk.{layer}.{module}.weight", {})[which] = w
    incomplete = [n for n, p in pairs.items() if set(p) != {"lora_a", "lora_b"}]
    if incomplete:
        raise ValueError(f"{adapter_dir}: LoRA tensors without their pair: {incomplete[:3]}")
    alpha, qtype = lora["alpha"], gguf.GGMLQuantizationType[merged_type]
    reader = base_reader(base_gguf)
    writer = gguf.GGUFWriter(str(tmp), lora["architecture"])
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.alignment"):
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    if "general.alignment" in reader.fields:  # the writer must pad to it, not just record it
        writer.add_custom_alignment(int(reader.fields["general.alignment"].contents()))
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[merged_type]])  # most weights are merged_type now
    writer.add_string("shoefix.format", FORMAT)
    writer.add_string("shoefix.base_gguf_sha256", sha256_file(base_gguf))
    writer.add_string("shoefix.adapter_digest", lora["digest"])
    writer.add_string("shoefix.merged_type", merged_type)
    merged = 0
    for t in reader.tensors:
        pair = pairs.pop(t.name, None)
        if pair is None:  # untouched: the base's own bytes and type
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        a, b = pair["lora_a"], pair["lora_b"]
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        if w.shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"{t.name}: base {w.shape} does not fit the LoRA {b.shape} x {a.shape}")
        w += (alpha / a.shape[0]) * (b @ a)  # llama.cpp's scale: alpha / rank
        w = np.ascontiguousarray(w)
        writer.add_tensor(t.name, w if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(w, qtype),
                          raw_dtype=qtype)
        merged += 1
    if pairs:
        raise ValueError(f"{adapter_dir}: LoRA for tensors the base lacks: {sorted(pairs)[:3]}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return merged
