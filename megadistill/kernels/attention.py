"""One attention entry point for every model in megadistill.

Layout is Wan's: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``, output ``[B, Sq, H, D]``.

Backends: ``reference`` (plain PyTorch, float32 logits; the oracle), ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention`` with an explicit boolean mask when one is
needed), ``triton`` (the fused flash-attention kernels of ``triton_attention``, which skip fully
masked key tiles). ``auto`` picks ``triton`` for CUDA tensors when triton imports, ``sdpa`` otherwise.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "sdpa", "triton")


def build_mask(sq, sk, *, device, block_causal_tokens=None, q_offset=0, key_lens=None,
               window_tokens=None, sink_tokens=0):
    """Boolean mask broadcastable to ``[B, 1, Sq, Sk]`` (True = attend), or None for full attention."""
    mask = None
    if block_causal_tokens is not None:
        n = int(block_causal_tokens)
        qi = torch.arange(sq, device=device) + q_offset
        kj = torch.arange(sk, device=device)
        q_end = (qi // n + 1) * n  # exclusive end of the query's frame block
        mask = kj[None, :] < q_end[:, None]
        if window_tokens is not None:
            keep = kj[None, :] >= (q_end[:, None] - int(window_tokens))
            if sink_tokens:
                keep = keep | (kj[None, :] < int(sink_tokens))
            mask = mask & keep
        mask = mask[None, None]
    elif window_tokens is not None:
        raise ValueError("window_tokens/sink_tokens need block_causal_tokens (the window is measured "
                         "from the end of the query's frame block)")
    if key_lens is not None:
        kl = torch.as_tensor(key_lens, device=device).view(-1, 1, 1, 1)
        valid = torch.arange(sk, device=device).view(1, 1, 1, sk) < kl
        mask = valid if mask is None else (mask & valid)
    return mask


def visible_pairs(sq, sk, *, block_causal_tokens=None, q_offset=0, key_lens=None, batch=1,
                  window_tokens=None, sink_tokens=0):
    """Number of (query, key) pairs ``build_mask`` lets attend, summed over the batch (per head).

    Counted per query row in O(Sq) memory, so it works at 32760 x 32760 where the dense mask would
    not; effective FLOPs of masked attention are ``4 * D * visible_pairs`` per head (forward).
    """
    qi = torch.arange(sq, dtype=torch.int64) + int(q_offset)
    lo = torch.zeros(sq, dtype=torch.int64)
    hi = torch.full((sq,), sk, dtype=torch.int64)
    if block_causal_tokens is not None:
        n = int(block_causal_tokens)
        q_end = (qi // n + 1) * n
        hi = torch.minimum(hi, q_end)
        if window_tokens is not None:
            lo = (q_end - int(window_tokens)).clamp(min=0)
    elif window_tokens is not None:
        raise ValueError("window_tokens/sink_tokens need block_causal_tokens")
    lens = [sk] * batch if key_lens is None else [min(int(n), sk) for n in torch.as_tensor(key_lens).tolist()]
    total = 0
    sinks = int(sink_tokens) if window_tokens is not None else 0
    for kl in lens:
        h = hi.clamp(max=kl)
        window = (h - lo).clamp(min=0)
        extra = (torch.minimum(lo, h).clamp(max=sinks)).clamp(min=0)  # sink keys below the window
        total += int((window + extra).sum())
    return total


def _check_inputs(q, k, v, block_causal_tokens, q_offset, key_lens, window_tokens, sink_tokens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, S, H, D] tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads "
                         f"and head dim ([B, Sq, H, D] vs [B, Sk, H, D])")
    if block_causal_tokens is not None and int(block_causal_tokens) < 1:
        raise ValueError(f"block_causal_tokens must be >= 1, got {block_causal_tokens}")
    if int(q_offset) < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    if window_tokens is not None and block_causal_tokens is None:
        raise ValueError("window_tokens/sink_tokens need block_causal_tokens (the window is measured "
                         "from the end of the query's frame block)")
    if window_tokens is not None and int(window_tokens) < 1:
        raise ValueError(f"window_tokens must be >= 1, got {window_tokens}")
    if int(sink_tokens) < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    if key_lens is not None:
        kl = torch.as_tensor(key_lens)
        if kl.numel() != q.shape[0]:
            raise ValueError(f"key_lens has {kl.numel()} entries; give one per batch element "
                             f"({q.shape[0]})")
        if bool((kl < 0).any()):
            raise ValueError(f"key_lens must be >= 0, got {kl.tolist()}")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend, q):
    """The backend ``auto`` stands for with this input (triton on CUDA when it imports, else sdpa)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_importable() else "sdpa"
    return backend


def attention(q, k, v, *, backend="auto", block_causal_tokens=None, q_offset=0, key_lens=None,
              window_tokens=None, sink_tokens=0, scale=None):
    """softmax(scale * q k^T + mask) v per head; mask semantics of ``build_mask``."""
    backend = resolve_backend(backend, q)
    _check_inputs(q, k, v, block_causal_tokens, q_offset, key_lens, window_tokens, sink_tokens)
    if backend == "triton":
        from .triton_attention import flash_attention  # imported lazily: TRITON_INTERPRET is read then

        return flash_attention(q, k, v, block_causal_tokens=block_causal_tokens, q_offset=q_offset,
                               key_lens=key_lens, window_tokens=window_tokens,
                               sink_tokens=sink_tokens, scale=scale)
    mask = build_mask(q.shape[1], k.shape[1], device=q.device, block_causal_tokens=block_causal_tokens,
                      q_offset=q_offset, key_lens=key_lens, window_tokens=window_tokens,
                      sink_tokens=sink_tokens)
    if backend == "reference":
        s = scale if scale is not None else q.shape[-1] ** -0.5
        logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * s
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.float())
        return out.to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
