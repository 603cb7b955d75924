"""Build a Wan model on the meta device and fill it tensor by tensor from a checkpoint.

A parameter whose (local) shape is smaller than the checkpoint's full shape is a tensor-parallel
shard: the checkpoint reader returns only this rank's slice, so a 14B model is never materialized
whole on a rank, nor twice anywhere.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def build_on_meta(cls, config, *args, **kwargs):
    with torch.device("meta"):
        return cls(config, *args, **kwargs)


def _tp_coords(full_shape, local_shape, split_dim):
    """(rank, size) of the slice this parameter holds, from the tensor-parallel grid."""
    if tuple(full_shape) == tuple(local_shape):
        return 0, 1
    from megadistill import distributed as dist_grid

    size, rank = dist_grid.get_tp_size(), dist_grid.get_tp_rank()
    if split_dim is None or full_shape[split_dim] != local_shape[split_dim] * size:
        raise ValueError(f"parameter of shape {tuple(local_shape)} cannot hold a tp={size} slice of "
                         f"a checkpoint tensor of shape {tuple(full_shape)}")
    return rank, size


def load_parameters(model: nn.Module, ckpt, dtype=None, device="cpu"):
    """Replace every parameter of ``model`` (possibly on meta) by the checkpoint's tensor.
    Keys in the checkpoint that the model lacks, or the reverse, are errors."""
    from .keys import tp_split_dim

    names = dict(model.named_parameters())
    available = set(ckpt.keys())
    missing = [n for n in names if n not in available]
    if missing:
        raise KeyError(f"checkpoint {ckpt.path} lacks {len(missing)} parameters of the model, e.g. "
                       f"{missing[:5]}")
    for name, param in names.items():
        split = tp_split_dim(name)
        rank, size = _tp_coords(ckpt.shape(name), param.shape, split)
        t = ckpt.load(name, tp_rank=rank, tp_size=size, dtype=dtype).to(device)
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"{name}: checkpoint gives shape {tuple(t.shape)}, model expects "
                             f"{tuple(param.shape)}")
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[leaf] = nn.Parameter(t, requires_grad=param.requires_grad)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"buffer {name} is still on the meta device after loading")
    return model


def materialize(model: nn.Module, device="cpu", dtype=None):
    """Give every meta parameter real (uninitialized) storage, for a model to be filled later."""
    return model.to_empty(device=device) if dtype is None else model.to_empty(device=device).to(dtype)
