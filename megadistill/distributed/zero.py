"""ZeRO-3 wiring: build a model whose parameters are partitioned from the first moment, and fill
them one tensor at a time, so no rank ever holds the whole model (a 14B teacher is 28 GB in bf16).

    model = build_partitioned(lambda: WanDiT(config), ds_config, fill=lambda name, p: ckpt.load(name))

Under ``deepspeed.zero.Init`` each parameter is partitioned over the data-parallel group as soon as
it is created. ``fill(name, param)`` then runs on rank 0 only, inside ``GatheredParameters``, for one
parameter at a time; DeepSpeed broadcasts it from rank 0 and re-partitions it on exit.
"""
from __future__ import annotations

import torch


def zero_stage(ds_config) -> int:
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def build_partitioned(construct, ds_config: dict, fill, mpu=None, dtype=None):
    """``construct()`` builds the module; ``fill(name, param) -> tensor`` gives each parameter's full
    value (called on rank 0 only). Returns the partitioned module."""
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu, dtype=dtype or torch.float32):
        module = construct()
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    param.copy_(fill(name, param).to(param.dtype))
    return module


def gathered_state_dict(module) -> dict:
    """Full tensors of a (possibly ZeRO-3 partitioned) module, gathered one parameter at a time; for
    small models and tests (a 14B model should be exported from its checkpoint instead)."""
    import deepspeed

    out = {}
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param]):
                out[name] = param.detach().clone()
        else:
            out[name] = param.detach().clone()
    return out
