"""Ulysses sequence parallel attention.

Activations are sharded on the sequence across the P ranks of the sp group: rank r holds tokens
``[r*S/P, (r+1)*S/P)`` of every head. Attention needs every token, so around it

    [B, S/P, H, D]  --all-to-all (scatter heads, gather sequence)-->  [B, S, H/P, D]
    attn_fn on a head shard of the full sequence
    [B, S, H/P, D]  --all-to-all (scatter sequence, gather heads)-->  [B, S/P, H, D]

Attention is independent per head, so this equals full attention exactly. One self-attention
moves four all-to-alls forward (q, k, v, output) and four backward.

A sequence that does not divide P is padded at the end (:func:`pad_to_multiple`) before
sharding; the padded keys are masked by passing ``key_lens`` (the number of valid tokens) to
``attn_fn``, and padded query rows are dropped by :func:`unpad` afterwards.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .comm import all_to_all, gather_from_group, group_size, scatter_to_group


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = 1) -> tuple[torch.Tensor, int]:
    """Zero-pad ``x`` at the end of ``dim`` to a multiple of ``multiple``; return it and the
    original length (pass that to :func:`unpad`)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    dim = dim % x.dim()
    length = x.shape[dim]
    pad = (-length) % multiple
    if pad == 0:
        return x, length
    widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]  # F.pad lists widths from the last dim backwards
    return F.pad(x, widths), length


def unpad(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """The first ``length`` entries of ``x`` along ``dim`` (inverse of :func:`pad_to_multiple`)."""
    if length > x.shape[dim]:
        raise ValueError(f"cannot unpad dimension {dim} of shape {tuple(x.shape)} to a longer length {length}")
    return x.narrow(dim, 0, length)


def shard_sequence(x: torch.Tensor, group, dim: int = 1) -> tuple[torch.Tensor, int]:
    """Pad the full sequence to a multiple of the sp size and keep this rank's shard.
    Returns the shard and the valid (unpadded) length. Backward all-gathers the gradient."""
    x, length = pad_to_multiple(x, group_size(group), dim)
    return scatter_to_group(x, dim, group), length


def gather_sequence(x: torch.Tensor, length: int, group, dim: int = 1) -> torch.Tensor:
    """All-gather sequence shards and drop the padding (inverse of :func:`shard_sequence`)."""
    return unpad(gather_from_group(x, dim, group), length, dim)


def _merge_key_lens(given, valid_len: int, batch: int, device):
    lens = torch.full((batch,), valid_len, dtype=torch.long, device=device)
    if given is None:
        return lens
    return torch.minimum(torch.as_tensor(given, device=device).to(torch.long).reshape(-1).expand(batch), lens)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_fn, group,
                      valid_len: int | None = None, **attn_kwargs) -> torch.Tensor:
    """Attention over the full sequence for sequence-sharded ``q, k, v`` of shape ``[B, S/P, H, D]``.

    ``attn_fn(q, k, v, **attn_kwargs)`` gets ``[B, S, H/P, D]`` tensors and returns the output in
    the same layout; the result is this rank's ``[B, S/P, H, D]`` shard of the output.
    ``valid_len``: the number of real tokens when the gathered sequence S was padded; keys at
    positions ``>= valid_len`` are masked through ``key_lens`` (combined by minimum with a
    ``key_lens`` already in ``attn_kwargs``). ``group=None`` or size 1 calls ``attn_fn`` directly.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ulysses_attention expects {name} as [B, S_local, H, D], got shape {tuple(t.shape)}")
    size = group_size(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[2] % size != 0:
            raise ValueError(f"{name} has {t.shape[2]} heads, not divisible by the sequence-parallel size {size}: "
                             f"Ulysses splits heads across sp; choose parallel.sp (times tp) dividing the heads")
    if size > 1:
        q, k, v = (all_to_all(t, 2, 1, group) for t in (q, k, v))
    if valid_len is not None and valid_len < k.shape[1]:
        attn_kwargs["key_lens"] = _merge_key_lens(attn_kwargs.get("key_lens"), valid_len, k.shape[0], k.device)
    out = attn_fn(q, k, v, **attn_kwargs)
    return all_to_all(out, 1, 2, group) if size > 1 else out
