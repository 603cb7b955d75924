"""The process grid: every parallel group is built here, once.

Layout. ``world = pp x dp x sp x tp`` with tp innermost (neighbouring ranks, the fastest
links), then sp, then dp, pp outermost::

    rank = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp + tp_rank

Groups (each a set of ranks that differ only along the named axes):

    tp      tensor parallel (Megatron column/row linears, q/k RMSNorm reduction)
    sp      Ulysses sequence parallel (all-to-all around attention)
    dp      pure data parallel (ranks that read different samples)
    pp      pipeline stages
    dp_sp   ranks holding identical weights: the ZeRO partition / gradient-averaging group
    tp_pp   model parallel: the ranks that together hold one full model replica

The launcher (``deepspeed`` or ``torchrun``) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`initialize` reads them through ``init_method="env://"``. NCCL is used when
CUDA is available, gloo otherwise.

Without a launcher and without :func:`initialize`, every size is 1, every rank 0 and every group
``None``: one process runs with no process group at all. Group ``None`` means "no parallelism"
to everything in :mod:`megadistill.distributed` (the collectives become identities); it never
means "the world group".
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

AXES = ("pp", "dp", "sp", "tp")  # outermost -> innermost
GROUP_KINDS = {  # kind -> axes that vary inside one group of that kind
    "tp": ("tp",),
    "sp": ("sp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "dp_sp": ("dp", "sp"),
    "tp_pp": ("pp", "tp"),
}


# ----------------------------------------------------------------------------- pure layout math


def layout_check(world: int, tp: int = 1, sp: int = 1, pp: int = 1, num_heads: int | None = None) -> int:
    """Validate a layout and return the derived data-parallel size ``dp = world / (tp*sp*pp)``.

    Raises ValueError naming the numbers to change when a size is not a positive integer, when
    ``tp*sp*pp`` does not divide the world size, or when the attention heads do not split evenly
    over ``tp*sp`` (tensor parallel splits heads, Ulysses splits them again).
    """
    for name, value in (("world size", world), ("parallel.tp", tp), ("parallel.sp", sp), ("parallel.pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    model = tp * sp * pp
    if world % model != 0:
        raise ValueError(
            f"world size {world} is not divisible by tp*sp*pp = {tp}*{sp}*{pp} = {model}: use a world size "
            f"that is a multiple of {model} or change parallel.tp/sp/pp")
    if num_heads is not None and num_heads % (tp * sp) != 0:
        raise ValueError(
            f"num_heads {num_heads} is not divisible by tp*sp = {tp}*{sp} = {tp * sp}: tensor parallel and "
            f"Ulysses both split the heads; choose parallel.tp and parallel.sp whose product divides {num_heads}")
    return world // model


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int = 1
    sp: int = 1
    pp: int = 1

    def __post_init__(self):
        layout_check(self.world, self.tp, self.sp, self.pp)

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.sp * self.pp)

    def sizes(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "sp": self.sp, "tp": self.tp}


def rank_to_coords(rank: int, layout: Layout) -> dict[str, int]:
    """Coordinates ``{pp, dp, sp, tp}`` of a global rank (tp varies fastest)."""
    if not 0 <= rank < layout.world:
        raise ValueError(f"rank {rank} is outside a world of size {layout.world}")
    coords = {}
    for axis in reversed(AXES):
        size = layout.sizes()[axis]
        coords[axis] = rank % size
        rank //= size
    return {axis: coords[axis] for axis in AXES}


def coords_to_rank(layout: Layout, pp: int = 0, dp: int = 0, sp: int = 0, tp: int = 0) -> int:
    sizes = layout.sizes()
    rank = 0
    for axis, value in zip(AXES, (pp, dp, sp, tp)):
        if not 0 <= value < sizes[axis]:
            raise ValueError(f"{axis} coordinate {value} is outside 0..{sizes[axis] - 1}")
        rank = rank * sizes[axis] + value
    return rank


def group_ranks(layout: Layout, kind: str) -> list[list[int]]:
    """All groups of one kind as sorted lists of global ranks; together they partition the world.

    Inside a group, a rank's group rank is its index in the list, so for ``dp_sp`` it is
    ``dp_rank * sp + sp_rank`` and for ``tp_pp`` it is ``pp_rank * tp + tp_rank``.
    """
    if kind not in GROUP_KINDS:
        raise ValueError(f"unknown group kind {kind!r}; choose one of {sorted(GROUP_KINDS)}")
    varying = GROUP_KINDS[kind]
    fixed = [a for a in AXES if a not in varying]
    sizes = layout.sizes()
    grid = torch.arange(layout.world).view(*(sizes[a] for a in AXES))
    order = [AXES.index(a) for a in fixed] + [AXES.index(a) for a in AXES if a in varying]
    per_group = 1
    for a in varying:
        per_group *= sizes[a]
    return grid.permute(order).reshape(-1, per_group).tolist()


# ----------------------------------------------------------------------------- the live grid


@dataclass
class ProcessGrid:
    """This rank's place in the layout and its process groups (``None`` groups when world is 1
    without a process group)."""

    layout: Layout
    rank: int
    groups: dict = field(default_factory=dict)       # kind -> ProcessGroup | None
    members: dict = field(default_factory=dict)      # kind -> list of global ranks in my group

    @property
    def coords(self) -> dict[str, int]:
        return rank_to_coords(self.rank, self.layout)

    def group(self, kind: str):
        return self.groups[kind]

    def size(self, kind: str) -> int:
        return len(self.members[kind])

    def rank_in(self, kind: str) -> int:
        return self.members[kind].index(self.rank)

    def name_of(self, group) -> str | None:
        """The kind of one of this grid's groups (``"tp"``, ``"dp_sp"``, ...), or None."""
        for kind, g in self.groups.items():
            if g is not None and g is group:
                return kind
        return None

    def __str__(self):
        c = self.coords
        L = self.layout
        return (f"rank {self.rank}/{L.world}: pp {c['pp']}/{L.pp} dp {c['dp']}/{L.dp} "
                f"sp {c['sp']}/{L.sp} tp {c['tp']}/{L.tp}")


_GRID: ProcessGrid | None = None
_OWNS_DEFAULT_GROUP = False


def _init_default_group(backend: str | None):
    """Start torch.distributed from the launcher's environment; False when there is no launcher."""
    global _OWNS_DEFAULT_GROUP
    if "WORLD_SIZE" not in os.environ:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with `deepspeed` or "
                           f"`torchrun`, which set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # Bind the device before the first collective so NCCL creates its communicator on it.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    _OWNS_DEFAULT_GROUP = True
    return True


def initialize(tp: int = 1, sp: int = 1, pp: int = 1, *, backend: str | None = None) -> ProcessGrid:
    """Build the process grid (and torch.distributed, if not yet initialized); return it.

    dp is derived as ``world / (tp*sp*pp)``. Calling again with the same layout returns the
    existing grid; a different layout raises (call :func:`destroy` first).
    Without a launcher environment (no WORLD_SIZE) and no process group, only the 1-rank layout
    is possible and the grid has no process groups at all.
    """
    global _GRID
    if not dist.is_initialized() and _GRID is None:
        started = _init_default_group(backend)
        if not started and tp * sp * pp != 1:
            raise ValueError(f"tp*sp*pp = {tp * sp * pp} needs several processes, but WORLD_SIZE is not set: "
                             f"launch with `deepspeed --num_gpus N` or `torchrun --nproc_per_node N`")
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = Layout(world, tp, sp, pp)
    if _GRID is not None:
        if _GRID.layout != layout:
            raise ValueError(f"the process grid is already initialized as {_GRID.layout}; asked for {layout}. "
                             f"Call megadistill.distributed.destroy() first to change the layout")
        return _GRID
    rank = dist.get_rank() if dist.is_initialized() else 0
    grid = ProcessGrid(layout=layout, rank=rank)
    for kind in GROUP_KINDS:  # every rank creates every group, in the same order (new_group is collective)
        for ranks in group_ranks(layout, kind):
            g = dist.new_group(ranks=ranks) if dist.is_initialized() else None
            if rank in ranks:
                grid.groups[kind] = g
                grid.members[kind] = ranks
    _GRID = grid
    return grid


def destroy():
    """Tear down the grid's groups, and torch.distributed if :func:`initialize` started it."""
    global _GRID, _OWNS_DEFAULT_GROUP
    if _GRID is not None and dist.is_initialized():
        for g in _GRID.groups.values():
            if g is not None:
                dist.destroy_process_group(g)
    _GRID = None
    if _OWNS_DEFAULT_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_DEFAULT_GROUP = False


def is_initialized() -> bool:
    return _GRID is not None


def get_grid() -> ProcessGrid | None:
    return _GRID


def _live_grid() -> ProcessGrid | None:
    if _GRID is None and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("torch.distributed runs several processes but the process grid is not built: "
                           "call megadistill.distributed.initialize(tp=..., sp=..., pp=...) first")
    return _GRID


def _group(kind):
    grid = _live_grid()
    return None if grid is None else grid.group(kind)


def _size(kind):
    grid = _live_grid()
    return 1 if grid is None else grid.size(kind)


def _rank(kind):
    grid = _live_grid()
    return 0 if grid is None else grid.rank_in(kind)


def get_tp_group():
    return _group("tp")


def get_tp_rank() -> int:
    return _rank("tp")


def get_tp_size() -> int:
    return _size("tp")


def get_sp_group():
    return _group("sp")


def get_sp_rank() -> int:
    return _rank("sp")


def get_sp_size() -> int:
    return _size("sp")


def get_dp_group():
    return _group("dp")


def get_dp_rank() -> int:
    return _rank("dp")


def get_dp_size() -> int:
    return _size("dp")


def get_pp_group():
    return _group("pp")


def get_pp_rank() -> int:
    return _rank("pp")


def get_pp_size() -> int:
    return _size("pp")


def get_dp_sp_group():
    """Ranks holding identical weights (dp x sp): the ZeRO partition and gradient-reduce group."""
    return _group("dp_sp")


def get_dp_sp_rank() -> int:
    return _rank("dp_sp")


def get_dp_sp_size() -> int:
    return _size("dp_sp")


def get_model_parallel_group():
    """tp x pp: the ranks that together hold one full model replica."""
    return _group("tp_pp")


def group_ranks_of(kind: str) -> list[int]:
    """Global ranks in this rank's group of one kind (``[0]`` without a grid)."""
    grid = _live_grid()
    return [0] if grid is None else list(grid.members[kind])


# ----------------------------------------------------------------------------- DeepSpeed mpu


class DeepSpeedMPU:
    """The grid in the shape DeepSpeed's ``mpu`` argument expects (checked against DeepSpeed 0.19).

    Who calls what in DeepSpeed 0.19:
      engine: get_data_parallel_{group,world_size,rank}, get_model_parallel_{world_size,rank}
        (checkpoint file names ``mp_rank_XX``), get_sequence_data_parallel_{group,world_size,
        rank}, get_tensor_model_parallel_{rank,group,src_rank}; config:
        get_data_parallel_world_size (batch-size arithmetic);
      ZeRO-3 / ZeRO-1,2: get_model_parallel_{group,rank,world_size} (grad-norm and overflow
        all-reduce), get_data_parallel_group (parameter partitioning);
      checkpointing / bwc: get_tensor_model_parallel_*, get_slice_parallel_*,
        get_pipeline_model_parallel_*, get_pipe_parallel_*, get_data_parallel_group_ranks;
      activation checkpointing: get_tensor_model_parallel_*, get_data_parallel_rank.

    Meanings here:
      data parallel      = dp x sp, the ranks with identical weights; ZeRO partitions parameters,
                           gradients and optimizer states over it and AVERAGES gradients over it.
                           To DeepSpeed every dp x sp rank is a data-parallel replica, so
                           train_batch_size = micro * grad_accum * dp * sp, and under Ulysses each
                           rank's loss must be the mean over its own sequence shard (equivalently:
                           the partial loss of its tokens times sp).
      model parallel     = tp x pp, rank = pp_rank * tp + tp_rank (unique per shard, so DeepSpeed
                           checkpoint names do not collide across stages).
      tensor/slice       = tp;  pipeline/pipe = pp.

    Deliberately absent:
      get_sequence_parallel_{world_size,rank,group}: given these, DeepSpeed 0.19 divides the
        gradient sum by dp instead of dp*sp on some paths (ZeRO-1/2, ZeRO-3 with
        ``reduce_scatter: false``) but not on others (ZeRO-3 ``reduce_scatter: true``, the
        default), so the gradient scale would depend on a config flag. Without them DeepSpeed
        averages over dp x sp on every path. Use get_sp_group() for Ulysses.
      initialize_sequence_parallel: an mpu that has it is taken for DeepSpeed's own Ulysses
        module, which ignores get_data_parallel_group / get_model_parallel_group.

    With pp > 1 note that DeepSpeed's ZeRO gradient norm counts a parameter that is not
    tensor-parallel only on model-parallel rank 0, i.e. only on the first stage: clip across
    stages in the training loop (or keep DeepSpeed's ``gradient_clipping`` at 0) when pp > 1.
    """

    # model parallel (tp x pp)
    def get_model_parallel_group(self):
        return _group("tp_pp")

    def get_model_parallel_rank(self):
        return _rank("tp_pp")

    def get_model_parallel_world_size(self):
        return _size("tp_pp")

    def get_model_parallel_src_rank(self):
        return group_ranks_of("tp_pp")[0]

    # tensor parallel (tp); "slice" is DeepSpeed's older name for it
    def get_tensor_model_parallel_group(self):
        return _group("tp")

    def get_tensor_model_parallel_rank(self):
        return _rank("tp")

    def get_tensor_model_parallel_world_size(self):
        return _size("tp")

    def get_tensor_model_parallel_src_rank(self):
        return group_ranks_of("tp")[0]

    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    # pipeline parallel (pp)
    def get_pipeline_model_parallel_group(self):
        return _group("pp")

    def get_pipeline_model_parallel_rank(self):
        return _rank("pp")

    def get_pipeline_model_parallel_world_size(self):
        return _size("pp")

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size

    # data parallel for ZeRO (dp x sp)
    def get_data_parallel_group(self):
        return _group("dp_sp")

    def get_data_parallel_rank(self):
        return _rank("dp_sp")

    def get_data_parallel_world_size(self):
        return _size("dp_sp")

    def get_data_parallel_group_ranks(self):
        return group_ranks_of("dp_sp")

    get_sequence_data_parallel_group = get_data_parallel_group
    get_sequence_data_parallel_rank = get_data_parallel_rank
    get_sequence_data_parallel_world_size = get_data_parallel_world_size

mpu = DeepSpeedMPU()
