"""Checkpoint key names of the Wan DiT and how each tensor is split under tensor parallelism.

megadistill's parameter names ARE Wan's native names (``blocks.0.self_attn.q.weight``), so a native
checkpoint needs no renaming; diffusers' ``WanTransformer3DModel`` names map one to one.
Note native ``norm3`` (the affine norm before cross-attention) is diffusers ``norm2``.
"""
from __future__ import annotations

import re

# native suffix inside a block -> diffusers suffix inside a block
_BLOCK_NATIVE_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "norm3": "norm2",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_TOP_NATIVE_TO_DIFFUSERS = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_BLOCK_DIFFUSERS_TO_NATIVE = {v: k for k, v in _BLOCK_NATIVE_TO_DIFFUSERS.items()}
_TOP_DIFFUSERS_TO_NATIVE = {v: k for k, v in _TOP_NATIVE_TO_DIFFUSERS.items()}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(.+)\.(weight|bias)$")


class UnknownKeyError(KeyError):
    pass


def native_to_diffusers(name: str) -> str:
    if name == "head.modulation":
        return "scale_shift_table"
    m = re.match(r"^blocks\.(\d+)\.modulation$", name)
    if m:
        return f"blocks.{m.group(1)}.scale_shift_table"
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NATIVE_TO_DIFFUSERS:
        return f"blocks.{m.group(1)}.{_BLOCK_NATIVE_TO_DIFFUSERS[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.match(name)
    if m and m.group(1) in _TOP_NATIVE_TO_DIFFUSERS:
        return f"{_TOP_NATIVE_TO_DIFFUSERS[m.group(1)]}.{m.group(2)}"
    raise UnknownKeyError(f"not a Wan DiT native key: {name!r}")


def diffusers_to_native(name: str) -> str:
    if name == "scale_shift_table":
        return "head.modulation"
    m = re.match(r"^blocks\.(\d+)\.scale_shift_table$", name)
    if m:
        return f"blocks.{m.group(1)}.modulation"
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_DIFFUSERS_TO_NATIVE:
        return f"blocks.{m.group(1)}.{_BLOCK_DIFFUSERS_TO_NATIVE[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.match(name)
    if m and m.group(1) in _TOP_DIFFUSERS_TO_NATIVE:
        return f"{_TOP_DIFFUSERS_TO_NATIVE[m.group(1)]}.{m.group(2)}"
    raise UnknownKeyError(f"not a Wan DiT diffusers key: {name!r}")


def expected_native_keys(num_layers: int, cross_attn_norm: bool = True) -> list:
    """Every tensor name of a Wan T2V DiT in native naming, in ``state_dict`` order."""
    keys = ["patch_embedding.weight", "patch_embedding.bias"]
    for top in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                "time_projection.1"):
        keys += [f"{top}.weight", f"{top}.bias"]
    for i in range(num_layers):
        keys.append(f"blocks.{i}.modulation")  # a module's own parameters precede its children's
        for sub, mod in _BLOCK_NATIVE_TO_DIFFUSERS.items():
            if sub == "norm3" and not cross_attn_norm:
                continue
            keys.append(f"blocks.{i}.{sub}.weight")
            if not sub.endswith(("norm_q", "norm_k")):
                keys.append(f"blocks.{i}.{sub}.bias")
    keys += ["head.modulation", "head.head.weight", "head.head.bias"]
    return keys


def block_index(name: str):
    """The block number of a native key, or None for embeddings and head."""
    m = re.match(r"^blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# --- tensor-parallel plan ------------------------------------------------------------------------
# Megatron layout: q/k/v and FFN-in are column parallel (output features split, dim 0 of the
# weight and of the bias), o and FFN-out are row parallel (input features split, dim 1 of the
# weight; bias kept whole and added once after the all-reduce). The q/k RMSNorm weight covers the
# full hidden dim across heads, so it is split like q/k's output features.
_COLUMN = ("self_attn.q", "self_attn.k", "self_attn.v", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "ffn.0", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q",
           "cross_attn.norm_k")
_ROW = ("self_attn.o", "cross_attn.o", "ffn.2")


def tp_split_dim(name: str):
    """Dimension along which tensor ``name`` (native naming) is split across tp ranks, or None if
    every tp rank holds it whole."""
    m = _BLOCK_RE.match(name)
    if not m:
        return None
    sub, kind = m.group(2), m.group(3)
    if sub in _COLUMN:
        return 0
    if sub in _ROW and kind == "weight":
        return 1
    return None


def pp_stage_of(name: str, stage_blocks: list) -> list:
    """Pipeline stages that hold tensor ``name``. ``stage_blocks[s]`` is the (start, stop) block range
    of stage s. Embeddings live on the first stage, the head on the last; ``time_embedding`` and
    ``time_projection`` are needed by every stage (each block's modulation reads the projected
    time), so every stage holds a copy of them."""
    b = block_index(name)
    n = len(stage_blocks)
    if b is not None:
        for s, (lo, hi) in enumerate(stage_blocks):
            if lo <= b < hi:
                return [s]
        raise ValueError(f"block {b} of {name!r} is in no pipeline stage {stage_blocks}")
    if name.startswith(("time_embedding", "time_projection")):
        return list(range(n))
    if name.startswith("head."):
        return [n - 1]
    return [0]


def even_stage_blocks(num_layers: int, pp: int) -> list:
    """Split ``num_layers`` blocks into ``pp`` contiguous stages, sizes differing by at most one
    (earlier stages take the extra block; the last stage also carries the head)."""
    if pp < 1 or pp > num_layers:
        raise ValueError(f"cannot split {num_layers} blocks into pp={pp} stages")
    base, extra = divmod(num_layers, pp)
    out, lo = [], 0
    for s in range(pp):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out
