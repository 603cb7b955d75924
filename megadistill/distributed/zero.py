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


def init_config_for_dtype(ds_config: dict, dtype=None) -> dict:
    """A copy of ``ds_config`` whose ``bf16`` / ``fp16`` sections say ``dtype`` (float32 when None),
    for ``deepspeed.zero.Init(config_dict_or_path=..., dtype=None)``.

    Why not Init's own ``dtype`` argument: DeepSpeed reads it as ``dtype or float16 if
    accelerator.is_fp16_supported() else bfloat16 if ...``, so on a CPU accelerator whose oneDNN has
    no fp16 (AVX2-only x86, for one) an explicit float32 partitions every parameter in bfloat16.
    Without ``dtype`` Init takes the precision from the config, which this copy states exactly.
    """
    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"ZeRO-3 partitions parameters in float32, bfloat16 or float16, not {dtype}")
    config = {k: v for k, v in ds_config.items() if k != "bfloat16"}  # the old name of the bf16 section
    config["bf16"] = {**ds_config.get("bf16", ds_config.get("bfloat16", {})), "enabled": dtype == torch.bfloat16}
    config["fp16"] = {**ds_config.get("fp16", {}), "enabled": dtype == torch.float16}
    return config


def build_partitioned(construct, ds_config: dict, fill, mpu=None, dtype=None):
    """``construct()`` builds the module; ``fill(name, param) -> tensor`` gives each parameter's full
    value (called on rank 0 only). Returns the partitioned module."""
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.Init(config_dict_or_path=init_config_for_dtype(ds_config, dtype), mpu=mpu):
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
