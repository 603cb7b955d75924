"""Tensor-parallel layers (Megatron semantics) holding only this rank's shard.

With P ranks in the tensor-parallel group and rank r:

    ColumnParallelLinear   W = [W_0; W_1; ...] split on the output dim, weight [out/P, in]
                           y_r = x W_r^T + b_r                 (output channels shard r)
    RowParallelLinear      W = [W_0, W_1, ...] split on the input dim,  weight [out, in/P]
                           y = sum_r x_r W_r^T + b             (bias added once, after the sum)
    TPRMSNorm              channels split across ranks, weight [C/P]
                           y_r = x_r * rsqrt(sum_r' |x_r'|^2 / C + eps) * w_r

A column layer followed by a row layer needs one all-reduce forward (after the row layer) and one
backward (at the column layer's input). Parameter and state-dict names are those of nn.Linear
(``weight``, ``bias``), so a tp-sliced checkpoint tensor loads with ``load_state_dict``, and
``from_linear`` turns a built nn.Linear into its parallel counterpart.

Megatron sequence parallel (``sequence_parallel=True``): between the row layer of one block and
the column layer of the next, activations are split along the sequence dim across the tp ranks.
The row layer then reduce-scatters along the sequence instead of all-reducing, the column layer
all-gathers along the sequence (its backward reduce-scatters), and the norms in between run on a
sequence shard. Parameters replicated over tp that see only a sequence shard (the row bias, the
norms' weights) are marked ``param.sequence_parallel = True``; call
:func:`allreduce_sequence_parallel_grads` after backward to sum their gradients over tp.

Sharded parameters carry ``tensor_model_parallel = True`` and ``partition_dim`` (the attributes
DeepSpeed's gradient-norm code and Megatron read).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .comm import (all_gather_along_dim, all_reduce_, copy_to_group, gather_from_group, group_rank, group_size,
                   reduce_from_group, reduce_partial_sums, reduce_scatter_along_dim, scatter_to_group)


def tp_shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of ``full`` along ``dim`` out of ``size`` equal slices."""
    if full.shape[dim] % size != 0:
        raise ValueError(f"cannot split dimension {dim} of size {full.shape[dim]} (shape {tuple(full.shape)}) "
                         f"into {size} tensor-parallel shards; choose a tp that divides {full.shape[dim]}")
    n = full.shape[dim] // size
    return full.narrow(dim, rank * n, n).clone()


def _divide(n: int, size: int, what: str) -> int:
    if n % size != 0:
        raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel size {size}; "
                         f"choose parallel.tp dividing {n}")
    return n // size


def _mark_tp(param: nn.Parameter, partition_dim: int):
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim


def _local_shape(param) -> tuple:
    """The shape of this rank's tensor; ``ds_shape`` for one that ZeRO-3 has partitioned (its
    ``shape`` is then the empty local placeholder's)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _init_linear_(weight, bias, fan_in):
    # nn.Linear's default init, with the fan-in of the FULL layer (a row shard sees in/P inputs,
    # but its values must be drawn as for the unsharded layer).
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split along its output dim: weight ``[out/P, in]``, bias ``[out/P]``.

    Input: the full activation ``[..., in]`` (replicated over tp), or with ``sequence_parallel``
    a shard along ``seq_dim`` that is all-gathered first. Output: this rank's ``out/P`` channels,
    or all ``out`` channels with ``gather_output=True``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None,
                 gather_output: bool = False, sequence_parallel: bool = False, seq_dim: int = 1,
                 device=None, dtype=None):
        super().__init__()
        self.group = group
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel, self.seq_dim = gather_output, sequence_parallel, seq_dim
        local_out = _divide(out_features, group_size(group), "ColumnParallelLinear out_features")
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(local_out, in_features, **kw))
        _mark_tp(self.weight, 0)
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out, **kw))
            _mark_tp(self.bias, 0)
        else:
            self.register_parameter("bias", None)
        _init_linear_(self.weight, self.bias, in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, **kwargs) -> "ColumnParallelLinear":
        """This rank's column shard of a built nn.Linear (rows ``[r*out/P, (r+1)*out/P)``)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group=group,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        rank, size = group_rank(group), group_size(group)
        with torch.no_grad():
            layer.weight.copy_(tp_shard(linear.weight, 0, rank, size))
            if linear.bias is not None:
                layer.bias.copy_(tp_shard(linear.bias, 0, rank, size))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = all_gather_along_dim(x, self.seq_dim, self.group)
        else:
            x = copy_to_group(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_group(y, -1, self.group)
        return y

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {_local_shape(self.weight)[0]}), bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split along its input dim: weight ``[out, in/P]``, bias ``[out]``.

    Input: this rank's ``in/P`` channels (``input_is_parallel=True``, e.g. a column layer's
    output) or the full input, which is split here. The partial products are summed over tp
    (or reduce-scattered along ``seq_dim`` with ``sequence_parallel``); the bias is added once,
    after the sum.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, seq_dim: int = 1,
                 device=None, dtype=None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear with sequence_parallel=True needs input_is_parallel=True")
        self.group = group
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel, self.seq_dim = input_is_parallel, sequence_parallel, seq_dim
        local_in = _divide(in_features, group_size(group), "RowParallelLinear in_features")
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, local_in, **kw))
        _mark_tp(self.weight, 1)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)
        _init_linear_(self.weight, self.bias, in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, **kwargs) -> "RowParallelLinear":
        """This rank's row shard of a built nn.Linear (columns ``[r*in/P, (r+1)*in/P)``); full bias."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group=group,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(tp_shard(linear.weight, 1, group_rank(group), group_size(group)))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_group(x, -1, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_along_dim(y, self.seq_dim, self.group)
        else:
            y = reduce_from_group(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return (f"in_features={self.in_features} (local {_local_shape(self.weight)[1]}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class TPRMSNorm(nn.Module):
    """RMSNorm over the FULL hidden dim ``C`` when each tp rank holds ``C/P`` of the channels.

    ``y_r = float(x_r) * rsqrt(sum_over_all_ranks(float(x)^2) / C + eps)``, cast back to the input
    dtype, times the local weight slice ``w_r`` (Wan's RMSNorm, which normalises in float32 and
    casts before the weight). The sum of squares is all-reduced over tp forward and, because each
    rank's output then depends on it differently, its gradient is all-reduced backward.
    """

    def __init__(self, full_dim: int, eps: float = 1e-6, group=None, device=None, dtype=None):
        super().__init__()
        self.full_dim, self.eps, self.group = full_dim, eps, group
        local = _divide(full_dim, group_size(group), "TPRMSNorm full_dim")
        self.weight = nn.Parameter(torch.ones(local, device=device, dtype=dtype))
        _mark_tp(self.weight, 0)

    @classmethod
    def from_full_weight(cls, weight: torch.Tensor, eps: float = 1e-6, group=None) -> "TPRMSNorm":
        """This rank's slice of a full ``[C]`` norm weight."""
        norm = cls(weight.shape[0], eps, group, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            norm.weight.copy_(tp_shard(weight, 0, group_rank(group), group_size(group)))
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"TPRMSNorm expects this rank's {self.weight.shape[0]} of {self.full_dim} channels "
                             f"in the last dim, got shape {tuple(x.shape)}")
        xf = x.float()
        sum_sq = reduce_partial_sums(xf.square().sum(-1, keepdim=True), self.group)
        y = xf * torch.rsqrt(sum_sq / self.full_dim + self.eps)
        return y.to(x.dtype) * self.weight

    def extra_repr(self):
        return f"full_dim={self.full_dim} (local {_local_shape(self.weight)[0]}), eps={self.eps}"


def mark_sequence_parallel(module: nn.Module) -> nn.Module:
    """Mark every parameter of ``module`` (e.g. a LayerNorm running on a sequence shard) as
    replicated over tp but fed only a sequence shard: its gradient needs a tp all-reduce."""
    for p in module.parameters():
        p.sequence_parallel = True
    return module


def allreduce_sequence_parallel_grads(module: nn.Module, group) -> int:
    """Sum over ``group`` the gradients of parameters marked ``sequence_parallel``; returns how
    many were reduced. Call after backward and before the optimizer step."""
    count = 0
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            all_reduce_(p.grad, group)
            count += 1
    return count
