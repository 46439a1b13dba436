"""`shoefix_varlen`: causal attention within each example of a packed (padding-free) batch.

TRL's padding-free collator flattens a micro-batch into one row and passes each example's boundaries
(`cu_seq_lens_q/k`) and restarting `position_ids`. With `sdpa`, transformers turns those into a dense
block-diagonal mask over the whole row, quadratic in the packed length; this kernel runs PyTorch's
varlen flash attention on the boundaries (CUDA), or one causal sdpa call per example (CPU): either way
no token attends across an example boundary (tests/training/test_packing.py checks that the loss
equals the unpacked one; speed figures in docs/benchmarks.md). It lives in `model/` because loading a
model registers it: inference must not import the training layer.
"""

from __future__ import annotations

from shoefix_tasks.config import VARLEN_ATTN


def register_attention(name: str | None) -> None:
    """Make our own attention implementations known to transformers before a model is loaded with
    one of them; other names (sdpa, eager, ...) are transformers' own and need nothing."""
    if name != VARLEN_ATTN:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
    # Like flash attention: no dense mask is built (None when unpadded), only a padded batch's 2D mask
    # comes through, and varlen_attention_forward refuses it.
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTN, flash_attention_mask)


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10, CUDA (flash) only
    except ImportError:
        return None
    return varlen_attn


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed example. query (B, H, T, D), key/value (B, Hkv, T, D);
    returns (B, T, H, D) as transformers' attention functions do.

    Sequences: `cu_seq_lens_q` from the padding-free collator (B == 1), or, without it, each row of an
    unpadded batch (e.g. scoring one example). A padded batch (a 2D mask) is refused: this kernel
    never masks padding, so recipes only pair it with packing (config.Recipe) and inference loads sdpa.
    """
    import torch
    import torch.nn.functional as F

    if attention_mask is not None:
        raise ValueError(f"{VARLEN_ATTN} attention takes packed (padding-free) batches, not padded ones")
    if dropout or kwargs.get("sliding_window"):
        raise ValueError(f"{VARLEN_ATTN} attention supports neither attention dropout nor sliding windows")
    b, n_heads, t, d = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # one sequence per row
        cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=query.device)
        max_len = t
    else:
        if b != 1:
            raise ValueError("cu_seq_lens_q given for a batch of several rows")
        max_len = int(kwargs.get("max_length_q") or int(cu.diff().max()))
    # (B, H, T, D) -> (tokens, heads, head_dim); GQA: repeat each key/value head for its query heads
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    rep = n_heads // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kernel = _varlen_kernel() if query.is_cuda else None
    if kernel is not None:
        cu = cu.to(device=query.device, dtype=torch.int32)
        # flash kernels take half precision only; under QLoRA the norms are upcast to fp32 (PEFT's
        # prepare_model_for_kbit_training), so q/k/v can arrive in fp32: run in the autocast dtype
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = (x.to(half) if x.dtype == torch.float32 else x for x in (q, k, v))
        out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, scale=scaling,
                     window_size=(-1, 0)).to(query.dtype)  # (-1, 0): every earlier token, none later = causal
    else:  # CPU (tests, the embedded default): one causal sdpa per example, same result
        bounds = cu.tolist()
        parts = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                v[s:e].transpose(0, 1), is_causal=True, scale=scaling).transpose(0, 1)
                 for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
        out = torch.cat(parts, dim=0)
    return out.reshape(b, t, n_heads, d), None
