"""Tensor-parallel MLP (plain and Megatron sequence parallel) and TPRMSNorm on 2 gloo processes
against the unsharded modules."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import megadistill.distributed as md

from _dist_spawn import spawn


def _full_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(8, 16), nn.Linear(16, 8)


def _wan_rmsnorm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)


def _check_mlp(rank, world, group):
    fc1, fc2 = _full_mlp()
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(2))
    x_ref = x.clone().requires_grad_()
    y_ref = fc2(F.gelu(fc1(x_ref)))
    (y_ref * g).sum().backward()

    col = md.ColumnParallelLinear.from_linear(fc1, group)
    row = md.RowParallelLinear.from_linear(fc2, group)
    assert col.weight.shape == (16 // world, 8) and col.bias.shape == (16 // world,)
    assert row.weight.shape == (8, 16 // world) and row.bias.shape == (8,)
    assert col.weight.tensor_model_parallel and row.weight.partition_dim == 1
    assert not getattr(row.bias, "tensor_model_parallel", False)

    x_tp = x.clone().requires_grad_()
    y = row(F.gelu(col(x_tp)))
    _close(y, y_ref, "tp MLP output")
    (y * g).sum().backward()  # the output is replicated: every rank computes the same loss
    _close(x_tp.grad, x_ref.grad, "tp MLP input grad")
    _close(col.weight.grad, md.tp_shard(fc1.weight.grad, 0, rank, world), "column weight grad")
    _close(col.bias.grad, md.tp_shard(fc1.bias.grad, 0, rank, world), "column bias grad")
    _close(row.weight.grad, md.tp_shard(fc2.weight.grad, 1, rank, world), "row weight grad")
    _close(row.bias.grad, fc2.bias.grad, "row bias grad")

    # a tp-sliced checkpoint tensor loads with the nn.Linear key names
    fresh = md.ColumnParallelLinear(8, 16, group=group)
    fresh.load_state_dict({"weight": md.tp_shard(fc1.weight.detach(), 0, rank, world),
                           "bias": md.tp_shard(fc1.bias.detach(), 0, rank, world)})
    _close(fresh(x), F.linear(x, fresh.weight, fresh.bias), "loaded column shard")
    gathered = md.ColumnParallelLinear.from_linear(fc1, group, gather_output=True)
    _close(gathered(x), fc1(x), "column gather_output")
    row_split = md.RowParallelLinear.from_linear(fc2, group, input_is_parallel=False)
    h = torch.randn(2, 6, 16)
    _close(row_split(h), fc2(h), "row input split here")

    # Megatron sequence parallel: activations sharded on the sequence (dim 1) between the layers
    col_sp = md.ColumnParallelLinear.from_linear(fc1, group, sequence_parallel=True)
    row_sp = md.RowParallelLinear.from_linear(fc2, group, sequence_parallel=True)
    x_sp = x.chunk(world, 1)[rank].clone().requires_grad_()
    y_sp = row_sp(F.gelu(col_sp(x_sp)))
    _close(y_sp, y_ref.chunk(world, 1)[rank], "sequence-parallel MLP output shard")
    (y_sp * g.chunk(world, 1)[rank]).sum().backward()  # per-rank loss on its sequence shard
    assert md.allreduce_sequence_parallel_grads(row_sp, group) == 1  # the row bias
    _close(x_sp.grad, x_ref.grad.chunk(world, 1)[rank], "sequence-parallel input grad")
    _close(col_sp.weight.grad, md.tp_shard(fc1.weight.grad, 0, rank, world), "sp column weight grad")
    _close(row_sp.weight.grad, md.tp_shard(fc2.weight.grad, 1, rank, world), "sp row weight grad")
    _close(row_sp.bias.grad, fc2.bias.grad, "sp row bias grad after tp all-reduce")

    # accounting: forward = one all-reduce of the output, backward = one at the column input
    with md.count_collectives() as counts:
        y = row(F.gelu(col(x_tp)))
    assert counts.calls() == 1 and counts.calls("all_reduce", "tp") == 1 and counts.bytes() == y.numel() * 4
    with md.count_collectives() as counts:
        y.sum().backward()
    assert counts.calls("all_reduce", "tp") == 1 and counts.bytes() == x_tp.numel() * 4
    assert "all_reduce" in counts.summary()


def _check_rmsnorm(rank, world, group):
    eps = 1e-6
    w = 1 + 0.1 * torch.randn(12, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(4))
    g = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = _wan_rmsnorm(x_ref, w_ref, eps)
    (y_ref * g).sum().backward()

    norm = md.TPRMSNorm.from_full_weight(w, eps, group)
    assert norm.weight.shape == (12 // world,)
    x_r = x.chunk(world, -1)[rank].clone().requires_grad_()
    y_r = norm(x_r)
    _close(y_r, y_ref.chunk(world, -1)[rank], "TPRMSNorm output")
    (y_r * g.chunk(world, -1)[rank]).sum().backward()
    _close(x_r.grad, x_ref.grad.chunk(world, -1)[rank], "TPRMSNorm input grad")
    _close(norm.weight.grad, w_ref.grad.chunk(world, -1)[rank], "TPRMSNorm weight grad")

    # bf16 input: normalised in fp32, cast to bf16, then times the weight (Wan's order)
    xb, wb = x.bfloat16(), w.bfloat16()
    norm_b = md.TPRMSNorm.from_full_weight(wb, eps, group)
    yb = norm_b(xb.chunk(world, -1)[rank])
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, _wan_rmsnorm(xb, wb, eps).chunk(world, -1)[rank], rtol=1e-2, atol=1e-2)


def _layers_worker(rank, world):
    md.initialize(tp=world, backend="gloo")
    _check_mlp(rank, world, md.get_tp_group())
    _check_rmsnorm(rank, world, md.get_tp_group())


def test_tp_layers_two_processes():
    spawn(_layers_worker, 2)


def test_layers_single_process_equal_plain_modules():
    fc1, fc2 = _full_mlp()
    x = torch.randn(3, 8)
    col, row = md.ColumnParallelLinear.from_linear(fc1), md.RowParallelLinear.from_linear(fc2)
    torch.testing.assert_close(row(col(x)), fc2(fc1(x)))
    w = torch.rand(8) + 0.5
    torch.testing.assert_close(md.TPRMSNorm.from_full_weight(w)(x), _wan_rmsnorm(x, w, 1e-6))
    layer = md.ColumnParallelLinear(8, 16)
    assert layer.weight.abs().max() <= 8 ** -0.5  # nn.Linear's init range with the full fan-in
