"""Reading pretrained weights for the frozen Wan components (text encoder, VAE).

Every loader here reads with safetensors or ``torch.load(weights_only=True)``, checks the key set and
every shape against the module it fills, and raises :class:`CheckpointError` naming the file and the
problem. Modules are built on the meta device and filled with ``load_state_dict(assign=True)``, so a
multi-billion-parameter encoder is never randomly initialised only to be overwritten.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A pretrained file is missing, unreadable, or does not fit the module it should fill."""


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` state dict with ``torch.load(weights_only=True)`` (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped; read them whole
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat state dict {{name: tensor}}, got {type(sd).__name__}")
    return sd


def safetensors_files(folder: str | os.PathLike, stem: str) -> list[Path]:
    """The weight files of a transformers/diffusers folder: ``{stem}.safetensors`` or the shards listed
    in ``{stem}.safetensors.index.json``."""
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that do not exist: {missing}")
        return shards
    raise CheckpointError(f"{folder}: no weights found (looked for {single.name} and {index.name})")


def load_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read and merge safetensors files; a key present in two files is an error."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f), device="cpu")
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{f}: cannot be read as safetensors: {e}") from e
        dup = sorted(set(part) & set(sd))
        if dup:
            raise CheckpointError(f"{f}: keys already present in another shard: {dup[:5]}")
        sd.update(part)
    return sd


def _few(names, n: int = 8) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def assign_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], source: str,
                      optional: frozenset = frozenset()) -> None:
    """Check ``sd`` against ``module`` (key set and every shape) and assign its tensors in place.

    ``optional`` lists module keys the file may leave out (tied weights filled afterwards by the caller).
    Raises :class:`CheckpointError` naming ``source`` on any missing, unexpected or mis-shaped tensor.
    """
    expected = module.state_dict()
    missing = set(expected) - set(sd) - set(optional)
    unexpected = set(sd) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_few(unexpected)}")
    bad_shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatches: " + "; ".join(bad_shapes[:8]))
    if problems:
        raise CheckpointError(f"{source}: does not match {type(module).__name__}: " + " | ".join(problems))
    module.load_state_dict({k: v for k, v in sd.items()}, strict=False, assign=True)


def check_materialized(module: nn.Module, source: str) -> None:
    """After an assign-load from meta, every parameter and buffer must hold real data."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: these tensors were not filled by the checkpoint: {_few(left)}")
