"""Differentiable collectives over an explicit process group (Megatron ``mappings`` style).

Each public function is an autograd pair: its backward is the collective that mirrors the forward.
Notation: P ranks in ``group``, rank r holds ``x_r``; ``dy_r`` is the gradient arriving at rank r.

    copy_to_group            fwd y_r = x                      bwd dx = sum_r dy_r          (all-reduce)
    reduce_from_group        fwd y = sum_r x_r                bwd dx_r = dy                (identity)
    reduce_partial_sums      fwd y = sum_r x_r                bwd dx_r = sum_r' dy_r'      (all-reduce)
    scatter_to_group         fwd y_r = chunk_r(x, dim)        bwd dx = cat_r(dy_r, dim)    (all-gather)
    gather_from_group        fwd y = cat_r(x_r, dim)          bwd dx_r = chunk_r(dy, dim)  (split)
    all_gather_along_dim     fwd y = cat_r(x_r, dim)          bwd dx_r = chunk_r(sum_r' dy_r', dim)
    reduce_scatter_along_dim fwd y_r = chunk_r(sum_r' x_r', dim)  bwd dx_r = cat_r'(dy_r', dim)
    all_to_all(s, g)         fwd y_r = cat_j(chunk_r(x_j, s), g)  bwd: all_to_all(dy, g, s)

The pairs differ in what the caller's computation after the collective looks like:
``reduce_from_group`` / ``gather_from_group`` assume the ranks then compute the same thing on the
same replicated tensor (each rank sees the full gradient), while ``reduce_partial_sums`` and
``all_gather_along_dim`` (Megatron sequence parallel) assume every rank then computes something
of its own, so the true gradient is the sum of every rank's gradient.

``group=None`` or a group of size 1 makes every function the identity (no communication).
Sizes along split dimensions must be divisible by P; the error says by what.

Backends: on torch 2.13 gloo supports all_reduce, all_gather_single/all_gather_into_tensor,
reduce_scatter_single/reduce_scatter_tensor and all_to_all_single, but its allgather rejects the
"stacked" output shape, so every buffer here is flat 1-D (the form all backends accept). No
send/recv fallback is needed on this torch.

Every collective that runs is reported to the observers in ``_observers`` as
``(kind, group, local_input_tensor)``; :mod:`megadistill.distributed.accounting` counts them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_observers: list = []

# torch >= 2.13 renamed the tensor collectives; older versions only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _record(kind: str, group, tensor: torch.Tensor):
    for observe in _observers:
        observe(kind, group, tensor)


def _check_divisible(x: torch.Tensor, dim: int, size: int, what: str):
    if x.shape[dim] % size != 0:
        raise ValueError(f"{what}: dimension {dim} of a tensor of shape {tuple(x.shape)} has size {x.shape[dim]}, "
                         f"which is not divisible by the group size {size}; pad it to a multiple of {size} "
                         f"(megadistill.distributed.ulysses.pad_to_multiple)")


# ----------------------------------------------------------------------------- raw collectives


def all_reduce_(x: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over the group (not differentiable; for gradient buffers)."""
    if group_size(group) == 1:
        return x
    _record("all_reduce", group, x)
    dist.all_reduce(x, group=group)
    return x


def _all_reduce(x, group):
    y = x.clone(memory_format=torch.contiguous_format)
    return all_reduce_(y, group)


def _split(x, dim, group):
    """This rank's chunk of ``x`` along ``dim`` (no communication)."""
    size = group_size(group)
    _check_divisible(x, dim, size, "split")
    n = x.shape[dim] // size
    return x.narrow(dim, group_rank(group) * n, n).contiguous()


def _all_gather(x, dim, group):
    size = group_size(group)
    x = x.contiguous()
    _record("all_gather", group, x)
    out = x.new_empty(size * x.numel())
    _all_gather_flat(out, x.view(-1), group=group)
    # [P, *shape] -> P moved next to dim -> merged with dim (rank-major, as torch.cat would)
    return out.view(size, *x.shape).movedim(0, dim).flatten(dim, dim + 1).contiguous()


def _reduce_scatter(x, dim, group):
    size = group_size(group)
    _check_divisible(x, dim, size, "reduce_scatter")
    stacked = x.unflatten(dim, (size, x.shape[dim] // size)).movedim(dim, 0).contiguous()
    _record("reduce_scatter", group, x)
    out = x.new_empty(stacked.shape[1:])
    _reduce_scatter_flat(out.view(-1), stacked.view(-1), group=group)
    return out


def _all_to_all(x, scatter_dim, gather_dim, group):
    size = group_size(group)
    _check_divisible(x, scatter_dim, size, "all_to_all")
    # chunk j (along scatter_dim) goes to rank j; what rank j sends us lands at out[j]
    send = x.unflatten(scatter_dim, (size, x.shape[scatter_dim] // size)).movedim(scatter_dim, 0).contiguous()
    _record("all_to_all", group, x)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv.view(-1), send.view(-1), group=group)
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1).contiguous()


# ----------------------------------------------------------------------------- autograd pairs


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return _all_reduce(dy, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class _ReducePartialSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _all_reduce(dy, ctx.group), None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, dy):
        return _all_gather(dy, ctx.dim, ctx.group), None, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, dy):
        return _split(dy, ctx.dim, ctx.group), None, None


class _AllGatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, dy):
        return _reduce_scatter(dy, ctx.dim, ctx.group), None, None


class _ReduceScatterAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, dy):
        return _all_gather(dy, ctx.dim, ctx.group), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, dy):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(dy, gather_dim, scatter_dim, ctx.group), None, None, None


def _dim(x, dim):
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, gradient summed over the group backward."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tensor-parallel region: sum of partial results forward, identity backward."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def reduce_partial_sums(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of per-rank partial sums, fed into per-rank math (e.g. the sum of squares of a norm over
    channels split across ranks): all-reduce forward, all-reduce backward."""
    return x if group_size(group) == 1 else _ReducePartialSums.apply(x, group)


def scatter_to_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Keep this rank's chunk along ``dim``; backward all-gathers the gradient."""
    return x if group_size(group) == 1 else _ScatterToGroup.apply(x, _dim(x, dim), group)


def gather_from_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order); backward keeps this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromGroup.apply(x, _dim(x, dim), group)


def all_gather_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate along ``dim`` forward; reduce-scatter the gradient backward (Megatron SP)."""
    return x if group_size(group) == 1 else _AllGatherAlongDim.apply(x, _dim(x, dim), group)


def reduce_scatter_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the group and keep this rank's chunk along ``dim``; all-gather backward."""
    return x if group_size(group) == 1 else _ReduceScatterAlongDim.apply(x, _dim(x, dim), group)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` into P chunks, send chunk j to rank j, and concatenate the
    chunks received from ranks 0..P-1 along ``gather_dim``. Shape: ``scatter_dim`` shrinks by P,
    ``gather_dim`` grows by P. Backward is the inverse all-to-all (the dims swapped)."""
    if group_size(group) == 1:
        return x
    scatter_dim, gather_dim = _dim(x, scatter_dim), _dim(x, gather_dim)
    if scatter_dim == gather_dim:
        raise ValueError(f"all_to_all needs different scatter and gather dims, got {scatter_dim} for both")
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)
