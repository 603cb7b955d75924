"""Process-grid layout math (no processes), layout errors, defaults, and a 4-process tp2 x sp2 grid."""
import itertools

import pytest
import torch
import torch.distributed as dist

import megadistill.distributed as md
from megadistill.distributed.grid import GROUP_KINDS, Layout, coords_to_rank, group_ranks, rank_to_coords

from _dist_spawn import spawn


@pytest.mark.parametrize("world,tp,sp,pp", [(8, 2, 2, 2), (16, 2, 2, 2), (8, 2, 2, 1), (12, 3, 1, 2)])
def test_rank_coordinates_and_groups(world, tp, sp, pp):
    layout = Layout(world, tp, sp, pp)
    dp = world // (tp * sp * pp)
    assert layout.dp == dp
    # rank = ((pp*dp + dp)*sp + sp)*tp + tp: tp innermost, pp outermost
    for p, d, s, t in itertools.product(range(pp), range(dp), range(sp), range(tp)):
        rank = ((p * dp + d) * sp + s) * tp + t
        assert rank_to_coords(rank, layout) == {"pp": p, "dp": d, "sp": s, "tp": t}
        assert coords_to_rank(layout, pp=p, dp=d, sp=s, tp=t) == rank
    for kind, varying in GROUP_KINDS.items():
        groups = group_ranks(layout, kind)
        assert sorted(r for g in groups for r in g) == list(range(world)), kind  # a partition of the world
        size = 1
        for a in varying:
            size *= layout.sizes()[a]
        for g in groups:
            assert len(g) == size and g == sorted(g)
            coords = [rank_to_coords(r, layout) for r in g]
            for axis in ("pp", "dp", "sp", "tp"):
                values = {c[axis] for c in coords}
                assert len(values) == (layout.sizes()[axis] if axis in varying else 1), (kind, axis, g)


def test_world8_tp2_sp2_pp2_groups_explicit():
    layout = Layout(8, tp=2, sp=2, pp=2)
    assert group_ranks(layout, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_ranks(layout, "sp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_ranks(layout, "pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_ranks(layout, "dp") == [[r] for r in range(8)]
    assert group_ranks(layout, "dp_sp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_ranks(layout, "tp_pp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    layout16 = Layout(16, tp=2, sp=2, pp=2)
    assert group_ranks(layout16, "dp") == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert group_ranks(layout16, "dp_sp")[0] == [0, 2, 4, 6]


def test_layout_errors_name_the_fix():
    assert md.layout_check(8, tp=2, sp=2, pp=1) == 2
    assert md.layout_check(8, tp=2, sp=2, num_heads=40) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp\*sp\*pp = 2\*2\*1 = 4: use a world "
                                         r"size that is a multiple of 4 or change parallel.tp/sp/pp"):
        md.layout_check(6, tp=2, sp=2)
    with pytest.raises(ValueError, match=r"num_heads 12 is not divisible by tp\*sp = 2\*4 = 8"):
        md.layout_check(16, tp=2, sp=4, num_heads=12)
    with pytest.raises(ValueError, match=r"parallel.tp must be a positive integer, got 0"):
        md.layout_check(4, tp=0)
    with pytest.raises(ValueError, match="rank 8 is outside a world of size 8"):
        rank_to_coords(8, Layout(8, 2))


def test_defaults_without_process_group(monkeypatch):
    assert not dist.is_initialized() and not md.is_initialized()
    for getter in ("tp", "sp", "dp", "pp", "dp_sp"):
        assert getattr(md, f"get_{getter}_size")() == 1
        assert getattr(md, f"get_{getter}_rank")() == 0
        assert getattr(md, f"get_{getter}_group")() is None
    assert md.get_grid() is None
    assert md.mpu.get_data_parallel_world_size() == 1 and md.mpu.get_model_parallel_rank() == 0
    assert md.mpu.get_data_parallel_group() is None and md.mpu.get_data_parallel_group_ranks() == [0]
    # DeepSpeed would ignore our groups (initialize_sequence_parallel) or rescale gradients by sp on
    # some code paths only (get_sequence_parallel_world_size); see DeepSpeedMPU
    assert not hasattr(md.mpu, "initialize_sequence_parallel")
    assert not hasattr(md.mpu, "get_sequence_parallel_world_size")

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="needs several processes, but WORLD_SIZE is not set"):
        md.initialize(tp=2, backend="gloo")
    try:
        grid = md.initialize()
        assert md.initialize() is grid and md.is_initialized() and not dist.is_initialized()
        assert grid.layout == Layout(1) and md.get_tp_group() is None and md.get_dp_sp_size() == 1
        with pytest.raises(ValueError):
            md.initialize(sp=2, backend="gloo")
    finally:
        md.destroy()
    assert not md.is_initialized()


def _grid_worker(rank, world):
    grid = md.initialize(tp=2, sp=2, backend="gloo")
    assert md.initialize(tp=2, sp=2, backend="gloo") is grid
    with pytest.raises(ValueError, match="already initialized"):
        md.initialize(tp=4)
    assert dist.get_backend() == "gloo"
    layout = Layout(4, tp=2, sp=2)
    coords = rank_to_coords(rank, layout)
    assert grid.coords == coords
    assert (md.get_tp_rank(), md.get_sp_rank(), md.get_dp_rank(), md.get_pp_rank()) == \
        (coords["tp"], coords["sp"], 0, 0)
    assert (md.get_tp_size(), md.get_sp_size(), md.get_dp_size(), md.get_pp_size(), md.get_dp_sp_size()) == \
        (2, 2, 1, 1, 2)
    for kind in GROUP_KINDS:
        mine = next(g for g in group_ranks(layout, kind) if rank in g)
        group = grid.group(kind)
        assert dist.get_process_group_ranks(group) == mine, kind
        # the group really connects exactly those ranks
        total = md.reduce_from_group(torch.tensor([float(rank)]), group)
        assert total.item() == float(sum(mine)), kind
    assert md.get_dp_sp_group() is grid.group("dp_sp")
    # DeepSpeed mpu: data parallel = dp x sp, model parallel = tp x pp, tensor = tp, sequence = sp
    m = md.mpu
    assert m.get_data_parallel_group() is grid.group("dp_sp")
    assert m.get_data_parallel_world_size() == 2 and m.get_data_parallel_rank() == coords["sp"]
    assert m.get_data_parallel_group_ranks() == [r for r in range(4) if r % 2 == coords["tp"]]
    assert m.get_model_parallel_group() is grid.group("tp_pp") and m.get_model_parallel_world_size() == 2
    assert m.get_model_parallel_rank() == coords["tp"]
    assert m.get_tensor_model_parallel_group() is grid.group("tp")
    assert m.get_tensor_model_parallel_src_rank() == rank - coords["tp"]
    assert m.get_slice_parallel_world_size() == 2 and m.get_pipe_parallel_world_size() == 1
    assert m.get_pipeline_model_parallel_rank() == 0 and m.get_pipeline_model_parallel_world_size() == 1
    assert m.get_sequence_data_parallel_group() is grid.group("dp_sp")
    assert m.get_sequence_data_parallel_world_size() == 2


def test_grid_tp2_sp2_four_processes():
    spawn(_grid_worker, 4)
