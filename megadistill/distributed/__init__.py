"""Process grid (tp x sp x dp x pp), differentiable collectives, tensor-parallel layers, Ulysses
sequence-parallel attention and collective accounting."""
from .accounting import count_collectives
from .comm import (all_gather_along_dim, all_to_all, copy_to_group, gather_from_group, reduce_from_group,
                   reduce_partial_sums, reduce_scatter_along_dim, scatter_to_group)
from .grid import (DeepSpeedMPU, Layout, ProcessGrid, coords_to_rank, destroy, get_dp_group, get_dp_rank,
                   get_dp_size, get_dp_sp_group, get_dp_sp_rank, get_dp_sp_size, get_grid, get_model_parallel_group,
                   get_pp_group, get_pp_rank, get_pp_size, get_sp_group, get_sp_rank, get_sp_size, get_tp_group,
                   get_tp_rank, get_tp_size, group_ranks, initialize, is_initialized, layout_check, mpu,
                   rank_to_coords)
from .layers import (ColumnParallelLinear, RowParallelLinear, TPRMSNorm, allreduce_sequence_parallel_grads,
                     mark_sequence_parallel, tp_shard)
from .ulysses import gather_sequence, pad_to_multiple, shard_sequence, ulysses_attention, unpad

__all__ = [
    "initialize", "destroy", "is_initialized", "get_grid", "layout_check", "Layout", "ProcessGrid",
    "group_ranks", "rank_to_coords", "coords_to_rank", "mpu", "DeepSpeedMPU",
    "get_tp_group", "get_tp_rank", "get_tp_size", "get_sp_group", "get_sp_rank", "get_sp_size",
    "get_dp_group", "get_dp_rank", "get_dp_size", "get_pp_group", "get_pp_rank", "get_pp_size",
    "get_dp_sp_group", "get_dp_sp_rank", "get_dp_sp_size", "get_model_parallel_group",
    "copy_to_group", "reduce_from_group", "reduce_partial_sums", "scatter_to_group", "gather_from_group",
    "all_gather_along_dim", "reduce_scatter_along_dim", "all_to_all",
    "ColumnParallelLinear", "RowParallelLinear", "TPRMSNorm", "tp_shard", "mark_sequence_parallel",
    "allreduce_sequence_parallel_grads",
    "ulysses_attention", "pad_to_multiple", "unpad", "shard_sequence", "gather_sequence",
    "count_collectives",
]
