"""Tensor parallel and Ulysses sequence parallel for the Wan DiT, applied to a built model.

    model = WanDiT(config)                      # or built on the meta device
    parallelize_wan(model, tp_group, sp_group)  # swaps layers in place, returns the model
    out = model(latents, t, text)               # full tensors in, the full output on every rank

Tensor parallel (:func:`apply_tensor_parallel`, Megatron): in every block, in self- AND
cross-attention, ``q, k, v`` become column-parallel (heads split across the tp ranks), ``o``
row-parallel, ``norm_q, norm_k`` :class:`TPRMSNorm` (the RMS is over the FULL hidden dim, so each
rank's sum of squares is all-reduced); ``ffn.0`` column-, ``ffn.2`` row-parallel. Everything
outside the blocks (embeddings, time path, head, modulation tables, ``norm3``) stays whole on every
tp rank and is computed redundantly, which keeps the gradients of those parameters complete on
every tp rank.

Ulysses sequence parallel (:func:`apply_sequence_parallel`): each self-attention's ``attn_fn`` is
wrapped so that q/k/v go sequence-sharded -> head-sharded through an all-to-all and the output comes
back (:func:`megadistill.distributed.ulysses_attention`). Cross-attention attends from local query
tokens to the whole (replicated) text and needs no communication. Heads split over tp*sp.

Sequence layout. The S = F*H*W tokens are padded at the end to ``S_pad = n * sp`` with
``n = ceil(S / sp)``; sp rank r holds tokens ``[r*n, (r+1)*n)``. Padded tokens are zeros; their keys
are masked in self-attention (``key_lens = S``) and their output rows are dropped, so they change
nothing: every op other than self-attention is per token. RoPE cos/sin and, with per-frame
timesteps, the modulation vectors are taken for the rank's own tokens (a chunk may start and end
inside a frame: it then gets one modulation vector per token; a frame-aligned chunk keeps one per
frame).

Gradients. Under sp each rank computes its own tokens only, so the gradient a rank holds for any
parameter is the contribution of its tokens: the full gradient is the SUM over the sp ranks
(:func:`allreduce_sequence_parallel_grads`). DeepSpeed, given :data:`megadistill.distributed.mpu`,
AVERAGES over dp x sp instead, so with DeepSpeed each rank's loss must be the mean over its own
tokens (that is sp times its share of the full mean). Under tp the gradients of sharded
parameters are the shards of the full gradient and those of whole parameters are complete on
every tp rank.

Entries. ``model(latents, t, text)`` with full ``latents [B, C, F, H, W]`` returns the full output
(one all-gather over sp at the end). ``model(tokens, t, text, grid=(F, H, W))`` (equivalently
:meth:`ParallelWanDiT.forward_local`) takes this rank's chunk of patch tokens and returns the same
chunk of output tokens, with no gather: a trainer that takes its loss on local tokens calls
``model(local_chunk(patchify(latents, p), sp_group), t, text, grid=grid)`` and compares with
``local_chunk(patchify_output(target, p), sp_group)`` masked to the rank's valid rows
(:func:`chunk_bounds`). Call it through ``model(...)`` rather than ``forward_local`` under ZeRO-3,
so that DeepSpeed's module hooks gather the parameters.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megadistill.distributed import (ColumnParallelLinear, RowParallelLinear, TPRMSNorm, gather_from_group,
                                     pad_to_multiple, ulysses_attention)
from megadistill.distributed.comm import all_reduce_, group_rank, group_size

from .dit import WanAttention, WanDiT, rope_cos_sin
from .keys import tp_split_dim


# --- the layout transforms ----------------------------------------------------------------------

def _keep_grad_flag(new: nn.Module, old: nn.Module) -> nn.Module:
    flags = [p.requires_grad for p in old.parameters()]
    for p, flag in zip(new.parameters(), flags):
        p.requires_grad_(flag)
    return new


def _column(linear: nn.Linear, group) -> ColumnParallelLinear:
    if linear.weight.is_meta:
        layer = ColumnParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                     group=group, device="meta", dtype=linear.weight.dtype)
    else:
        layer = ColumnParallelLinear.from_linear(linear, group)
    return _keep_grad_flag(layer, linear)


def _row(linear: nn.Linear, group) -> RowParallelLinear:
    if linear.weight.is_meta:
        layer = RowParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  group=group, device="meta", dtype=linear.weight.dtype)
    else:
        layer = RowParallelLinear.from_linear(linear, group)
    return _keep_grad_flag(layer, linear)


def _tp_norm(norm: nn.Module, group) -> TPRMSNorm:
    w = norm.weight
    if w.is_meta:
        layer = TPRMSNorm(w.shape[0], norm.eps, group, device="meta", dtype=w.dtype)
    else:
        layer = TPRMSNorm.from_full_weight(w.detach(), norm.eps, group)
    return _keep_grad_flag(layer, norm)


def _parallelize_attention(attn: WanAttention, group):
    for name in ("q", "k", "v"):
        setattr(attn, name, _column(getattr(attn, name), group))
    attn.o = _row(attn.o, group)
    attn.norm_q = _tp_norm(attn.norm_q, group)
    attn.norm_k = _tp_norm(attn.norm_k, group)


def apply_tensor_parallel(model: WanDiT, group) -> WanDiT:
    """Megatron tensor parallel over ``group`` in every block (see the module docstring).
    Works on a meta model (the layers are built on meta with local shapes) and on a materialized
    one (each layer keeps this rank's slice of the full weights). ``group`` None or of size 1:
    nothing changes."""
    size = group_size(group)
    if size == 1:
        return model
    cfg = model.config
    for what, n in (("num_heads", cfg.num_heads), ("ffn_dim", cfg.ffn_dim)):
        if n % size:
            raise ValueError(f"tensor parallel size {size} does not divide {what}={n}; "
                             f"choose parallel.tp dividing {n}")
    for block in model.blocks:
        _parallelize_attention(block.self_attn, group)
        _parallelize_attention(block.cross_attn, group)
        block.ffn[0] = _column(block.ffn[0], group)
        block.ffn[2] = _row(block.ffn[2], group)
    return model


class UlyssesAttention:
    """``attn_fn`` for a self-attention running on a sequence shard: all-to-all to a head shard
    of the full sequence, ``inner`` attention, all-to-all back. ``valid_len`` (the unpadded
    sequence length) masks padded keys."""

    def __init__(self, inner, group):
        self.inner, self.group = inner, group

    def __call__(self, q, k, v, valid_len: int | None = None, **attn_kwargs):
        return ulysses_attention(q, k, v, self.inner, self.group, valid_len=valid_len, **attn_kwargs)

    def __repr__(self):
        return f"UlyssesAttention(sp={group_size(self.group)}, inner={getattr(self.inner, '__name__', self.inner)})"


def apply_sequence_parallel(model: WanDiT, group) -> WanDiT:
    """Ulysses over ``group``: wrap every block's self-attention; cross-attention stays local.
    ``group`` None or of size 1: nothing changes."""
    if group_size(group) == 1:
        return model
    for block in model.blocks:
        attn = block.self_attn
        if isinstance(attn.attn_fn, UlyssesAttention):
            raise ValueError("sequence parallel is already applied to this model")
        attn.attn_fn = UlyssesAttention(attn.attn_fn, group)
    return model


def parallelize_wan(model: WanDiT, tp_group=None, sp_group=None, sequence_parallel: bool = False) -> WanDiT:
    """Apply tensor parallel over ``tp_group`` and Ulysses over ``sp_group`` to ``model`` in place
    and give it the sharded forward (:class:`ParallelWanDiT`). Returns the model.

    ``sequence_parallel`` is Megatron's sequence parallel inside tp (activations split along the
    sequence between the row layer of one sub-block and the column layer of the next); it is not
    implemented for Wan: use Ulysses (``sp_group``) to split the sequence.
    """
    if sequence_parallel:
        raise NotImplementedError("Megatron sequence parallel (sequence_parallel=True) is not implemented for "
                                  "the Wan DiT; split the sequence with Ulysses (parallel.sp) instead")
    if getattr(model, "parallelized", False):
        raise ValueError("this model is already parallelized")
    heads, tp, sp = model.config.num_heads, group_size(tp_group), group_size(sp_group)
    if heads % (tp * sp):
        raise ValueError(f"num_heads={heads} is not divisible by tp*sp = {tp}*{sp}: tensor parallel and "
                         f"Ulysses both split the heads; choose parallel.tp and parallel.sp whose product "
                         f"divides {heads}")
    apply_tensor_parallel(model, tp_group)
    apply_sequence_parallel(model, sp_group)
    if type(model) is WanDiT:
        model.__class__ = ParallelWanDiT
    model.tp_group = tp_group if tp > 1 else None
    model.sp_group = sp_group if sp > 1 else None
    model.parallelized = True
    return model


def parallelize_from_grid(model: WanDiT) -> WanDiT:
    """:func:`parallelize_wan` with the tp and sp groups of the initialized process grid; the model
    unchanged when there is no grid or tp = sp = 1."""
    from megadistill import distributed as md

    if not md.is_initialized() or (md.get_tp_size() == 1 and md.get_sp_size() == 1):
        return model
    return parallelize_wan(model, md.get_tp_group(), md.get_sp_group())


def mark_tensor_parallel_parameters(model: nn.Module) -> nn.Module:
    """(Re)set ``tensor_model_parallel`` / ``partition_dim`` on the sharded parameters of the tp
    layers (a loader that replaces parameter objects drops these attributes)."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, TPRMSNorm)):
            for p in module.parameters():
                p.tensor_model_parallel, p.partition_dim = True, 0
        elif isinstance(module, RowParallelLinear):
            module.weight.tensor_model_parallel, module.weight.partition_dim = True, 1
    return model


def load_for_grid(model: WanDiT, ckpt, dtype=None, device="cpu") -> WanDiT:
    """Parallelize a meta ``model`` for the initialized grid, then load only this rank's tp shard
    of every tensor from ``ckpt`` (any format, a megadistill checkpoint at any saved tp)."""
    from .loading import load_parameters

    model = parallelize_from_grid(model)
    load_parameters(model, ckpt, dtype=dtype, device=device)
    return mark_tensor_parallel_parameters(model)


# --- token layout ---------------------------------------------------------------------------------

def patchify(latents: torch.Tensor, patch) -> torch.Tensor:
    """``[B, C, F*pt, H*ph, W*pw] -> [B, F*H*W, C*pt*ph*pw]``, tokens in (f, h, w) order, features in
    the order of the patch embedding's flattened Conv3d weight (c, pt, ph, pw)."""
    pt, ph, pw = patch
    b, c, ft, hh, ww = latents.shape
    f, h, w = ft // pt, hh // ph, ww // pw
    x = latents.reshape(b, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, f * h * w, c * pt * ph * pw)


def patchify_output(x: torch.Tensor, patch) -> torch.Tensor:
    """The inverse of :meth:`WanDiT.unpatchify`: ``[B, C, F*pt, H*ph, W*pw] -> [B, S, pt*ph*pw*C]``
    in the head's feature order (pt, ph, pw, c); use it to put a target in the output's layout."""
    pt, ph, pw = patch
    b, c, ft, hh, ww = x.shape
    f, h, w = ft // pt, hh // ph, ww // pw
    x = x.reshape(b, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, f * h * w, pt * ph * pw * c)


def chunk_bounds(num_tokens: int, rank: int, size: int) -> tuple[int, int, int]:
    """``(start, n, valid)``: rank ``rank`` of ``size`` holds tokens ``[start, start + n)`` of the
    sequence padded to ``n * size`` (``n = ceil(num_tokens / size)``); its first ``valid`` rows are
    real tokens."""
    n = -(-num_tokens // size)
    start = rank * n
    return start, n, max(0, min(n, num_tokens - start))


def local_chunk(tokens: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """This sp rank's chunk of a full token sequence (zero-padded to a multiple of the group size).
    No communication either way: the backward puts the chunk's gradient in place and zeros
    elsewhere, which is the sum-over-sp convention of the module docstring."""
    size = group_size(group)
    if size == 1:
        return tokens
    padded, length = pad_to_multiple(tokens, size, dim)
    start, n, _ = chunk_bounds(length, group_rank(group), size)
    return padded.narrow(dim, start, n)


def gather_chunks(chunk: torch.Tensor, num_tokens: int, group, dim: int = 1) -> torch.Tensor:
    """All-gather the sp ranks' chunks and drop the padding (the inverse of :func:`local_chunk`);
    the backward keeps this rank's chunk of the gradient."""
    if group_size(group) == 1:
        return chunk
    return gather_from_group(chunk, dim, group).narrow(dim, 0, num_tokens)


def _local_time(e, e0, grid, start: int, n: int):
    """The time embedding for local tokens ``[start, start + n)``. One timestep per sample
    (``G = 1``) applies to every token. Per-frame (``G = F``): a frame-aligned chunk keeps one vector
    per frame; otherwise each token gets its frame's vector (padded tokens the last frame's)."""
    if e.shape[1] == 1:
        return e, e0
    per_frame = grid[1] * grid[2]
    total = grid[0] * per_frame
    if start % per_frame == 0 and n % per_frame == 0 and start + n <= total:
        lo, hi = start // per_frame, (start + n) // per_frame
        return e[:, lo:hi], e0[:, lo:hi]
    frame = (torch.arange(start, start + n, device=e.device).clamp(max=total - 1)) // per_frame
    return e.index_select(1, frame), e0.index_select(1, frame)


def _local_rope(config, grid, device, start: int, n: int):
    cos, sin = rope_cos_sin(config, grid, device)
    pad = start + n - cos.shape[0]
    if pad > 0:  # padded tokens: any finite angle (their keys are masked, their rows dropped)
        cos, sin = F.pad(cos, (0, 0, 0, pad)), F.pad(sin, (0, 0, 0, pad))
    return cos[start:start + n], sin[start:start + n]


# --- the parallel model ------------------------------------------------------------------------------

class ParallelWanDiT(WanDiT):
    """A :class:`WanDiT` after :func:`parallelize_wan` (the class of the model is swapped in place,
    so parameter names, ``state_dict`` and ``isinstance(model, WanDiT)`` are unchanged).
    ``tp_group`` / ``sp_group``: the groups it was parallelized over (None: not split)."""

    tp_group = None
    sp_group = None

    def embed_patches(self, tokens):
        """Patch embedding of patch tokens ``[B, n, C*pt*ph*pw]``: the Conv3d applied to each patch
        (a module call, so ZeRO-3 gathers its weight)."""
        b, n, _ = tokens.shape
        patches = tokens.reshape(b * n, self.config.in_dim, *self.config.patch_size)
        return self.patch_embedding(patches).reshape(b, n, -1)

    def forward(self, latents, timestep, text_states, grid=None):
        """Full ``latents [B, C, F, H, W]`` -> the full output on every rank; or, with ``grid=(F, H,
        W)``, this rank's chunk of patch tokens -> the same chunk of output tokens
        (:meth:`forward_local`)."""
        if grid is not None:
            return self.forward_local(latents, timestep, text_states, grid)
        grid = self.token_grid(latents)
        tokens = patchify(latents.to(self.patch_embedding.weight.dtype), self.config.patch_size)
        out = self.forward_local(local_chunk(tokens, self.sp_group), timestep, text_states, grid)
        return self.unpatchify(gather_chunks(out, math.prod(grid), self.sp_group), grid)

    def forward_local(self, tokens, timestep, text_states, grid):
        """This sp rank's chunk of patch tokens ``[B, n, C*pt*ph*pw]`` (:func:`patchify` then
        :func:`local_chunk`) for a token grid ``(F, H, W)`` -> output tokens ``[B, n, pt*ph*pw*C_out]``
        for the same chunk (rows past the rank's ``valid`` count of :func:`chunk_bounds` are padding:
        drop them). ``timestep [B]`` or ``[B, F]``, ``text_states [B, L, text_dim]`` are full on
        every rank."""
        grid = tuple(int(g) for g in grid)
        num_tokens, size = math.prod(grid), group_size(self.sp_group)
        start, n, _ = chunk_bounds(num_tokens, group_rank(self.sp_group), size)
        b = tokens.shape[0]
        if tokens.dim() != 3 or tokens.shape[1] != n:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)}: expected [B, {n}, features], this rank's "
                             f"chunk of {num_tokens} tokens (grid {grid}) over sp={size}")
        x = self.embed_patches(tokens.to(self.patch_embedding.weight.dtype))
        e, e0 = self.embed_time(timestep.to(x.device) if torch.is_tensor(timestep) else timestep, b)
        if e.shape[1] not in (1, grid[0]):
            raise ValueError(f"per-frame timestep has {e.shape[1]} entries, latents have {grid[0]} frames")
        e, e0 = _local_time(e, e0, grid, start, n)
        context = self.embed_text(text_states.to(x.dtype))
        rope = _local_rope(self.config, grid, x.device, start, n)
        attn_kwargs = {"valid_len": num_tokens} if size > 1 else None
        x = self.run_blocks(x, e0, context, rope, attn_kwargs)
        return self.head(x, e)

    def save_pretrained(self, path, format: str = "megadistill", dtype=None, overwrite: bool = False,
                        role: str = "student"):
        """Collective: every rank calls it. The tp shards are all-gathered one tensor at a time within
        the tp group of global rank 0, and global rank 0 writes an ordinary (tp = 1) checkpoint;
        ``WanDiT.from_pretrained`` reads it at any tp. Returns after the files are complete."""
        from megadistill.checkpoint import check_destination

        from .checkpoint import save_wan_checkpoint

        group, writer = self.tp_group, (not dist.is_initialized()) or dist.get_rank() == 0
        ok = torch.ones(1)
        if writer:
            try:
                check_destination(path, overwrite)
            except FileExistsError:
                ok.zero_()
        if dist.is_initialized():  # agree before any gather, so no rank waits on a writer that gave up
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() == 0:
            raise FileExistsError(f"destination {path} already exists (checked on rank 0); "
                                  "pass overwrite=True to replace it")
        if writer:
            save_wan_checkpoint(full_state_dict(self), path, format=format, config=self.config, dtype=dtype,
                                overwrite=overwrite, role=role)
        elif group is not None and 0 in dist.get_process_group_ranks(group):
            for _ in full_state_dict(self):  # take part in rank 0's gathers
                pass
        if dist.is_initialized():
            dist.barrier()


# --- gradients and state across ranks ----------------------------------------------------------------

def gather_tp_tensor(name: str, tensor: torch.Tensor, group) -> torch.Tensor:
    """The full tensor ``name`` (native naming) from the tp ranks' shards (all-gather along
    :func:`tp_split_dim`); a tensor every tp rank holds whole is returned as is. Collective."""
    split = tp_split_dim(name)
    if group_size(group) == 1 or split is None:
        return tensor
    with torch.no_grad():
        return gather_from_group(tensor.detach().contiguous(), split, group)


def full_state_dict(model: nn.Module):
    """Yields ``(name, full tensor)`` for every entry of ``model.state_dict()``, gathering tp shards.
    A generator: every rank of the tp group must consume it to the end, in step."""
    group = getattr(model, "tp_group", None)
    for name, t in model.state_dict().items():
        yield name, gather_tp_tensor(name, t, group)


def allreduce_sequence_parallel_grads(model: nn.Module, group) -> int:
    """Sum every parameter's gradient over the sp ranks (each holds its own tokens' contribution);
    returns how many were reduced. Not needed under DeepSpeed, which averages over dp x sp."""
    count = 0
    if group_size(group) == 1:
        return count
    for p in model.parameters():
        if p.grad is not None:
            all_reduce_(p.grad, group)
            count += 1
    return count


__all__ = ["ParallelWanDiT", "UlyssesAttention", "allreduce_sequence_parallel_grads", "apply_sequence_parallel",
           "apply_tensor_parallel", "chunk_bounds", "full_state_dict", "gather_chunks", "gather_tp_tensor",
           "load_for_grid", "local_chunk", "mark_tensor_parallel_parameters", "parallelize_from_grid",
           "parallelize_wan", "patchify", "patchify_output"]
