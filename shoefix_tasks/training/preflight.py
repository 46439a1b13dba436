"""GPU preflight: before a worker touches data, check that it can run the recipe at all.

Run by the trainer CLI first thing. A recipe that needs CUDA (half-precision weights, QLoRA,
a bitsandbytes optimizer, fp16) or a node declared a GPU node (`SHOEFIX_REQUIRE_GPU=1`, set on
the `gpu` Celery workers and in trainer pods) gets three checks:

1. CUDA is present and runs a kernel (not only `is_available()`: a driver/toolkit mismatch
   passes that and fails at the first launch);
2. the GPU's free memory holds the recipe at micro-batch 1, the smallest shape the out-of-memory
   back-off can reach (so a larger micro-batch that does not fit is the back-off's job, not a
   failed node);
3. bitsandbytes' ops work on the device when the recipe uses QLoRA or an 8-bit optimizer: a tiny
   NF4 quantize/dequantize round trip and one 8-bit AdamW step.

A failure raises `PreflightError`; the CLI exits with `train.EXIT_PREFLIGHT` and the Airflow task
fails without retries (another try on the same node cannot help). CPU recipes skip it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoefix_tasks.config import Recipe, Settings
from shoefix_tasks.errors import PermanentError

log = logging.getLogger(__name__)
GIB = 1 << 30
CUDA_CONTEXT_BYTES = GIB  # CUDA context, cuBLAS workspaces, allocator slack
# Bytes of 16-bit activations kept per token, hidden unit and layer without recomputation:
# 34 (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 2, minus the attention
# score term 5as/h, which SDPA/flash attention never materialises).
ACT_BYTES_PER_TOKEN_HIDDEN_LAYER = 34
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "nf4": 0.55}  # nf4: 4 bits + absmax/scales
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


class PreflightError(PermanentError):
    """This node cannot run this recipe; retrying on it will not help."""


@dataclass(frozen=True)
class GpuProbe:
    cuda: bool
    name: str = ""
    free_bytes: int = 0
    total_bytes: int = 0
    error: str = ""


@dataclass(frozen=True)
class Needs:
    cuda: bool
    bitsandbytes: bool
    min_bytes: int  # GPU memory needed at micro-batch 1; 0 when the base's size is unknown


def uses_bitsandbytes(recipe: Recipe) -> bool:
    optim = recipe.train.optim
    return recipe.quant.load_in_4bit or "8bit" in optim or "bnb" in optim or optim.startswith("paged_")


def needs_cuda(recipe: Recipe, gpu_node: bool) -> bool:
    """CPU recipes train fp32 weights (with optional bf16 autocast); anything else is for a GPU."""
    return (gpu_node or uses_bitsandbytes(recipe) or recipe.model.dtype != "float32"
            or recipe.train.mixed_precision == "fp16")


def safetensors_param_count(folder: Path) -> int:
    """Parameters in a folder's *.safetensors, from the headers alone (no tensor is read)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


def estimate_min_bytes(recipe: Recipe, params: int, config: dict[str, Any]) -> int:
    """GPU memory for training at micro-batch 1 with the recipe's sequence length.

    weights (params x bytes/param) + activations (tokens x hidden x layers x 34 B; with gradient
    checkpointing only each layer's 2-byte input is kept, plus one layer's full set) + fp32 logits
    and their gradient (tokens x vocab x 8 B), + 10% and the CUDA context. E.g. Qwen2.5-1.5B, bf16,
    1024 tokens: 3.09 GB weights + 1.50 GB activations + 1.24 GB logits, x1.1, + 1 GiB -> 7.5 GB.
    """
    per_param = BYTES_PER_PARAM["nf4" if recipe.quant.load_in_4bit else recipe.model.dtype]
    tokens = recipe.train.max_length
    hidden = int(config.get("hidden_size", 0))
    layers = int(config.get("num_hidden_layers", 0))
    vocab = int(config.get("vocab_size", 0))
    act_scale = 2 if recipe.model.dtype == "float32" and recipe.train.mixed_precision == "no" else 1
    per_layer = tokens * hidden * ACT_BYTES_PER_TOKEN_HIDDEN_LAYER * act_scale
    if recipe.train.gradient_checkpointing:
        activations = tokens * hidden * 2 * act_scale * layers + per_layer
    else:
        activations = per_layer * layers
    logits = tokens * vocab * 8
    return int((params * per_param + activations + logits) * 1.1) + CUDA_CONTEXT_BYTES


def decide(needs: Needs, gpu: GpuProbe | None, bnb_error: str | None) -> list[str]:
    """The problems that make this node unfit for the recipe (empty: fit). Pure: probes injected."""
    if not needs.cuda:
        return []
    if gpu is None or not gpu.cuda:
        return [f"the recipe needs a CUDA GPU and none is usable here: {gpu.error if gpu else 'not probed'}"]
    problems = []
    if needs.min_bytes and gpu.free_bytes < needs.min_bytes:
        problems.append(f"{gpu.name} has {gpu.free_bytes / GIB:.1f} GiB free of {gpu.total_bytes / GIB:.1f} GiB; "
                        f"the recipe needs ~{needs.min_bytes / GIB:.1f} GiB even at micro-batch 1")
    if needs.bitsandbytes and bnb_error:
        problems.append(f"bitsandbytes does not work on {gpu.name}: {bnb_error}")
    return problems


def probe_gpu() -> GpuProbe:
    import torch

    if not torch.cuda.is_available():
        return GpuProbe(False, error=f"torch.cuda.is_available() is False (torch {torch.__version__}, "
                                     f"built for CUDA {torch.version.cuda})")
    try:
        index = int(os.environ.get("LOCAL_RANK", "0"))  # under accelerate launch: this rank's GPU
        torch.cuda.set_device(index)
        x = torch.ones(256, 256, device="cuda")
        if float((x @ x).sum()) != 256.0 ** 3:
            return GpuProbe(False, error="a 256x256 matmul on the GPU returned a wrong sum")
        free, total = torch.cuda.mem_get_info(index)
        return GpuProbe(True, torch.cuda.get_device_name(index), int(free), int(total))
    except Exception as err:  # noqa: BLE001 - any CUDA failure means the node is unfit
        return GpuProbe(False, error=f"CUDA is present but unusable: {err}")


def probe_bitsandbytes(device: str = "cuda") -> str | None:
    """None if a 4-bit NF4 round trip and an 8-bit AdamW step work on `device`, else the error."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        import torch

        w = torch.randn(128, 128, device=device, dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4")
        back = bnbf.dequantize_4bit(packed, state)
        rel = float((back.float() - w.float()).abs().mean() / w.float().abs().mean())
        if not rel < 0.2:  # NF4 of Gaussian weights is ~0.1 relative error
            return f"NF4 round trip error {rel:.2f} (expected < 0.2)"
        p = torch.nn.Parameter(torch.randn(4096, device=device))  # 8-bit state needs >= 4096 elements
        before = p.detach().clone()
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        if not torch.isfinite(p).all() or torch.equal(p.detach(), before):
            return "8-bit AdamW step left the parameter unchanged or non-finite"
        return None
    except Exception as err:  # noqa: BLE001 - missing library, no GPU kernel for this arch, ...
        return f"{type(err).__name__}: {err}"


def _base_shape(recipe: Recipe, settings: Settings) -> tuple[int, dict[str, Any]]:
    """(parameter count, config.json) of a local base; (0, {}) when it is not a local folder."""
    from shoefix_tasks.model.base import resolve_base

    try:
        resolved = resolve_base(recipe.model.base_model, settings)
    except FileNotFoundError:  # a hub id not in the local cache: the load itself will say so
        return 0, {}
    if not (resolved / "config.json").is_file():
        return 0, {}
    return safetensors_param_count(resolved), json.loads((resolved / "config.json").read_text())


def probe_liger() -> str | None:
    """None when Liger's kernels import (liger-kernel is optional: only recipes that turn it on need it)."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as err:  # ImportError, or Triton failing to initialise
        return f"{type(err).__name__}: {err}"
    return None


def check_node(recipe: Recipe, settings: Settings, gpu_probe: Callable[[], GpuProbe] = probe_gpu,
               bnb_probe: Callable[[], str | None] = probe_bitsandbytes,
               liger_probe: Callable[[], str | None] = probe_liger) -> dict[str, Any]:
    """Raise PreflightError if this node cannot run `recipe`; return what was checked."""
    gpu_node = os.environ.get("SHOEFIX_REQUIRE_GPU", "") in ("1", "true", "yes")
    if not needs_cuda(recipe, gpu_node):
        log.info("preflight skipped: recipe %s trains on the CPU", recipe.name)
        return {"skipped": True}
    params, config = _base_shape(recipe, settings)
    needs = Needs(True, uses_bitsandbytes(recipe), estimate_min_bytes(recipe, params, config) if params else 0)
    gpu = gpu_probe()
    bnb_error = bnb_probe() if needs.bitsandbytes and gpu.cuda else None
    problems = decide(needs, gpu, bnb_error)
    liger_error = liger_probe() if recipe.train.use_liger_kernel else None
    if liger_error:
        problems.append(f"the recipe uses Liger kernels and they do not load (pip install liger-kernel on the trainer image): {liger_error}")
    report = {"skipped": False, "gpu": gpu.name, "free_gib": round(gpu.free_bytes / GIB, 1),
              "needs_gib": round(needs.min_bytes / GIB, 1), "bitsandbytes": needs.bitsandbytes, "problems": problems}
    if problems:
        raise PreflightError("; ".join(problems))
    log.info("preflight passed: %s", report)
    return report
