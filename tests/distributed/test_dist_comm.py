"""Every collective's forward and backward on 2 gloo processes against single-process math."""
import torch

import megadistill.distributed as md
from megadistill.distributed import comm

from _dist_spawn import spawn


def _inputs(shape, world, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(world)]


def _check(name, rank, world, group, dist_op, ref_op, shape, *, replicated_input=False, replicated_output=False):
    """Run ``dist_op`` on this rank's input and compare output and input gradient with ``ref_op``
    applied in one process to every rank's input. The loss is sum_r <y_r, g_r> (per-rank outputs),
    or <y, g> counted once when the output is replicated (every rank computes the same thing)."""
    xs = _inputs(shape, world, seed=1)
    if replicated_input:
        xs = [xs[0]] * world
    leaves = [x.clone().requires_grad_() for x in xs]
    if replicated_input:
        leaves = [leaves[0]] * world
    ys = ref_op(leaves)
    gs = [torch.randn(y.shape, generator=torch.Generator().manual_seed(2 + r), dtype=y.dtype) for r, y in enumerate(ys)]
    if replicated_output:
        gs = [gs[0]] * world
        loss = (ys[0] * gs[0]).sum()
    else:
        loss = sum((y * g).sum() for y, g in zip(ys, gs))
    loss.backward()

    x = xs[rank].clone().requires_grad_()
    y = dist_op(x, group)
    torch.testing.assert_close(y, ys[rank].detach(), rtol=0, atol=1e-12, msg=f"{name} forward")
    (y * gs[rank]).sum().backward()
    torch.testing.assert_close(x.grad, leaves[rank].grad, rtol=0, atol=1e-12, msg=f"{name} backward")


def _comm_worker(rank, world):
    md.initialize(tp=world, backend="gloo")
    group = md.get_tp_group()
    cat = torch.cat
    chunk = lambda t, d: t.chunk(world, d)  # noqa: E731

    _check("copy_to_group", rank, world, group, md.copy_to_group,
           lambda xs: list(xs), (3, 4), replicated_input=True)
    _check("reduce_from_group", rank, world, group, md.reduce_from_group,
           lambda xs: [sum(xs)] * world, (3, 4), replicated_output=True)
    _check("reduce_partial_sums", rank, world, group, md.reduce_partial_sums,
           lambda xs: [sum(xs)] * world, (3, 4))
    for dim in (1, -1):
        _check(f"scatter_to_group dim {dim}", rank, world, group, lambda x, g: md.scatter_to_group(x, dim, g),
               lambda xs: list(chunk(xs[0], dim)), (2, 4, 6), replicated_input=True)
        _check(f"gather_from_group dim {dim}", rank, world, group, lambda x, g: md.gather_from_group(x, dim, g),
               lambda xs: [cat(xs, dim)] * world, (2, 3, 5), replicated_output=True)
        _check(f"all_gather_along_dim dim {dim}", rank, world, group,
               lambda x, g: md.all_gather_along_dim(x, dim, g), lambda xs: [cat(xs, dim)] * world, (2, 3, 5))
        _check(f"reduce_scatter_along_dim dim {dim}", rank, world, group,
               lambda x, g: md.reduce_scatter_along_dim(x, dim, g), lambda xs: list(chunk(sum(xs), dim)), (2, 4, 6))

    # all_to_all: rank r receives chunk r (along s) of every rank's x, concatenated along g in rank order
    def a2a_ref(s, g):
        return lambda xs: [cat([chunk(x, s)[r] for x in xs], g) for r in range(world)]
    for s, g in ((2, 1), (1, 2), (0, 3)):
        _check(f"all_to_all {s}->{g}", rank, world, group, lambda x, grp: md.all_to_all(x, s, g, grp),
               a2a_ref(s, g), (2, 4, 6, 2))

    # group None or size 1: identities, no collectives
    x = torch.randn(4, 6)
    solo = md.get_dp_group()  # dp == 1 here
    assert comm.group_size(solo) == 1
    with md.count_collectives() as counts:
        for grp in (None, solo):
            for fn in (md.copy_to_group, md.reduce_from_group, md.reduce_partial_sums):
                assert fn(x, grp) is x
            for fn in (md.scatter_to_group, md.gather_from_group, md.all_gather_along_dim, md.reduce_scatter_along_dim):
                assert fn(x, 1, grp) is x
            assert md.all_to_all(x, 0, 1, grp) is x
    assert counts.calls() == 0

    # clear errors for shapes that do not divide the group
    try:
        md.scatter_to_group(torch.randn(3, 5), 1, group)
        raise AssertionError("expected a ValueError")
    except ValueError as e:
        assert "not divisible by the group size 2" in str(e)


def test_collectives_forward_backward_two_processes():
    spawn(_comm_worker, 2)
