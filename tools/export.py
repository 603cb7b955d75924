#!/usr/bin/env python
"""Export one role of a megadistill training checkpoint as a Wan DiT checkpoint.

    python tools/export.py --checkpoint outputs/run/checkpoints/step_00001000 --role student \\
        --to diffusers --dst exported/student [--dtype bf16]

``--checkpoint`` is a ``step_XXXXXXXX`` folder, or a run's output folder (its newest complete
checkpoint is taken). ``--role``: a trainable role (``student``, ``critic``), or ``<role>_ema`` for
its EMA weights. The role's weights come from, in this order:

* ``<role>/state/``: a DeepSpeed engine checkpoint. ZeRO-3: every rank's fp32 partition
  (``zero_pp_rank_R_mp_rank_00_optim_states.pt``) is merged on the CPU, one tensor at a time;
  ZeRO-0/1/2: the full module in ``mp_rank_00_model_states.pt`` (weights in the training dtype).
* ``<role>.safetensors`` (training without DeepSpeed), ``ema_<role>.safetensors`` (EMA).

The model config comes from ``meta.json``'s resolved run config: the role's ``preset`` (with
``pipeline_config.text_len``) or the config of its ``path`` checkpoint. The output is a diffusers
``WanTransformer3DModel`` folder, a Wan native folder or a megadistill (tp/pp sharded) folder,
written under a temp name and renamed when complete. Every file is read with safetensors or
``torch.load(weights_only=True)``; DeepSpeed's optimizer files need three of its plain value
classes allow-listed for that (its enum of ZeRO stages and its loss-scaler records).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from bisect import bisect_right
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from megadistill.checkpoint import CheckpointError  # noqa: E402

META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_ZERO_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
ENGINE_TAG = "state"  # megadistill.train.checkpoint saves engines with tag="state"


# --- locating a checkpoint and a role ---------------------------------------------------------------

def find_checkpoint(path) -> Path:
    """A ``step_XXXXXXXX`` folder with meta.json: ``path`` itself, or the newest complete one under
    ``path`` or ``path/checkpoints``."""
    p = Path(path)
    if (p / META).is_file():
        return p
    for root in (p / "checkpoints", p):
        steps = sorted(c for c in root.iterdir() if _STEP_DIR.match(c.name) and (c / META).is_file()) \
            if root.is_dir() else []
        if steps:
            return steps[-1]
    raise CheckpointError(f"{p}: not a megadistill training checkpoint (no {META}) and no complete "
                          "step_XXXXXXXX checkpoint under it or its checkpoints/ folder")


def read_meta(step_dir) -> dict:
    try:
        meta = json.loads((Path(step_dir) / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{step_dir}/{META}: corrupt JSON ({e})") from None
    if meta.get("format") != "megadistill-training-checkpoint":
        raise CheckpointError(f"{step_dir}/{META}: format {meta.get('format')!r} is not a megadistill training "
                              "checkpoint")
    return meta


def split_role(role: str) -> tuple:
    """``"student_ema"`` -> ("student", True); ``"critic"`` -> ("critic", False)."""
    return (role[:-4], True) if role.endswith("_ema") else (role, False)


def role_source(step_dir: Path, meta: dict, role: str) -> tuple:
    """``(kind, path)``: kind is "deepspeed", "safetensors" or "config_path" (a frozen role: its weights
    are the checkpoint named by the run config)."""
    base, ema = split_role(role)
    saved = meta.get("roles", [])
    if ema:
        f = step_dir / f"ema_{base}.safetensors"
        if not f.is_file():
            have = sorted(p.name[4:-12] + "_ema" for p in step_dir.glob("ema_*.safetensors"))
            raise CheckpointError(f"{step_dir}: no EMA of role {base!r} (ema_{base}.safetensors); EMA roles here: "
                                  f"{have or 'none'} (training.ema: null, or EMA not supported under ZeRO-3)")
        return "safetensors", f
    if base in saved:
        if (step_dir / base / ENGINE_TAG).is_dir():
            return "deepspeed", step_dir / base / ENGINE_TAG
        if (step_dir / f"{base}.safetensors").is_file():
            return "safetensors", step_dir / f"{base}.safetensors"
        raise CheckpointError(f"{step_dir}: role {base!r} is listed in {META} but neither {base}/{ENGINE_TAG}/ nor "
                              f"{base}.safetensors exists (an incomplete copy?)")
    mc = (meta.get("config") or {}).get("models", {}).get(base)
    if mc and mc.get("path"):
        return "config_path", Path(mc["path"])
    raise CheckpointError(f"{step_dir}: role {base!r} is not saved here (saved roles: {saved}; add '_ema' for an "
                          "EMA) and the run config gives it no path")


# --- DeepSpeed engine checkpoints, read with weights_only=True ---------------------------------------

def _deepspeed_value_classes() -> list:
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
    except ImportError as e:
        raise CheckpointError(f"reading DeepSpeed optimizer files needs deepspeed installed ({e})") from None
    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def load_deepspeed_file(path) -> dict:
    """``torch.load(weights_only=True)`` of a DeepSpeed checkpoint file, memory-mapped."""
    try:
        with torch.serialization.safe_globals(_deepspeed_value_classes()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None


def _zero_files(engine_dir: Path, kind: str) -> list:
    found = []
    for p in engine_dir.iterdir():
        m = _ZERO_FILE.match(p.name)
        if m and m.group(3) == kind:
            if int(m.group(2)) != 0:
                raise CheckpointError(f"{p}: model-parallel DeepSpeed partitions (mp_rank > 0) are not supported")
            found.append((int(m.group(1)), p))
    ranks = [r for r, _ in sorted(found)]
    if ranks != list(range(len(ranks))):
        raise CheckpointError(f"{engine_dir}: {kind} state files of ranks {ranks}; expected ranks 0..N-1 "
                              "(a rank's file is missing)")
    return [p for _, p in sorted(found)]


def _flat_slice(groups: list, starts: list, lo: int, hi: int) -> torch.Tensor:
    """Elements ``[lo, hi)`` of the concatenation of ``groups`` (``starts``: their start offsets)."""
    pieces = []
    g = bisect_right(starts, lo) - 1
    while lo < hi:
        take = min(hi, starts[g] + groups[g].numel()) - lo
        pieces.append(groups[g].narrow(0, lo - starts[g], take))
        lo, g = lo + take, g + 1
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def iter_zero3_state_dict(engine_dir):
    """Yields ``(name, fp32 tensor)`` of a ZeRO-3 engine checkpoint, one tensor at a time.

    Layout (DeepSpeed stage 3): with ``W`` ranks, a parameter of ``n`` elements is padded to
    ``W * ceil(n / W)`` and rank ``r`` holds elements ``[r*p, (r+1)*p)``, ``p = ceil(n / W)``, at the
    current offset of its fp32 flat partition; parameters follow one another in the order of
    ``param_shapes`` (all groups, in order) and the partition holds nothing else. Frozen parameters
    are stored as per-rank fragments of the same split; buffers whole in the rank-0 module state.
    """
    engine_dir = Path(engine_dir)
    model_files, optim_files = _zero_files(engine_dir, "model"), _zero_files(engine_dir, "optim")
    if not model_files or len(model_files) != len(optim_files):
        raise CheckpointError(f"{engine_dir}: {len(model_files)} model and {len(optim_files)} optimizer state files; "
                              "a ZeRO-3 checkpoint has one of each per rank")
    world = len(optim_files)
    models = [load_deepspeed_file(f) for f in model_files]
    flats = []
    for f in optim_files:
        osd = load_deepspeed_file(f)["optimizer_state_dict"]
        stage, parts = int(osd.get("zero_stage", -1)), osd.get("partition_count")
        if stage != 3:
            raise CheckpointError(f"{f}: ZeRO stage {stage} optimizer file without mp_rank_00_model_states.pt")
        if parts != world:
            raise CheckpointError(f"{f}: written by {parts} ranks but {world} rank files are present")
        flats.append(list(osd["fp32_flat_groups"]))
    starts = [0]
    for t in flats[0][:-1]:
        starts.append(starts[-1] + t.numel())
    total = starts[-1] + flats[0][-1].numel()
    if any(sum(t.numel() for t in groups) != total for groups in flats):
        raise CheckpointError(f"{engine_dir}: ranks hold fp32 partitions of different sizes")
    m0 = models[0]
    if m0.get("shared_params"):
        raise CheckpointError(f"{engine_dir}: shared (tied) parameters {sorted(m0['shared_params'])} are not supported")
    for name in m0.get("buffer_names", []):
        yield name, m0["module"][name]
    for name, shape in (m0.get("frozen_param_shapes") or {}).items():
        n = math.prod(shape)
        yield name, torch.cat([m["frozen_param_fragments"][name].reshape(-1) for m in models])[:n].view(tuple(shape))
    offset = 0
    for group in m0["param_shapes"]:
        for name, shape in group.items():
            n = math.prod(shape)
            p = math.ceil(n / world)
            full = torch.cat([_flat_slice(flats[r], starts, offset, offset + p) for r in range(world)])
            yield name, full[:n].view(tuple(shape)).clone()
            offset += p
    if offset != total:
        raise CheckpointError(f"{engine_dir}: parameters cover {offset} of the {total} elements of each rank's fp32 "
                              "partition; the checkpoint does not match its own parameter list")


def iter_engine_state_dict(engine_dir):
    """``(name, tensor)`` of any DeepSpeed engine checkpoint folder (the ``<role>/state`` folder)."""
    engine_dir = Path(engine_dir)
    full = engine_dir / "mp_rank_00_model_states.pt"
    if full.is_file():  # ZeRO-0/1/2: every rank holds the whole module
        module = load_deepspeed_file(full).get("module")
        if not isinstance(module, dict) or not module:
            raise CheckpointError(f"{full}: holds no module state")
        yield from module.items()
        return
    yield from iter_zero3_state_dict(engine_dir)


def iter_role_state_dict(step_dir, role: str, meta: dict | None = None):
    """``(name, tensor)`` of role ``role`` in training checkpoint ``step_dir``."""
    from safetensors import safe_open

    step_dir = Path(step_dir)
    kind, path = role_source(step_dir, meta or read_meta(step_dir), role)
    if kind == "deepspeed":
        yield from iter_engine_state_dict(path)
    elif kind == "safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: cannot be read as safetensors: {e}") from None
    else:
        from megadistill.models.wan.checkpoint import open_wan_checkpoint

        with open_wan_checkpoint(path) as ckpt:
            for n in ckpt.keys():
                yield n, ckpt.load(n)


# --- the model config ------------------------------------------------------------------------------

def role_config(meta: dict, role: str, num_heads: int | None = None, tensors=None) -> tuple:
    """``(WanConfig, where it came from)`` of ``role``, from the run config in meta.json (see the module
    doc). Without a preset or a reachable path, ``tensors()`` (the role's state dict) gives the shapes
    to infer it from."""
    from megadistill.models.wan.checkpoint import infer_config, open_wan_checkpoint
    from megadistill.models.wan.config import get_preset

    cfg = meta.get("config") or {}
    base, _ = split_role(role)
    mc = cfg.get("models", {}).get(base) or {}
    family = mc.get("family") or cfg.get("recipe", {}).get("family", "wan")
    if family != "wan":
        raise CheckpointError(f"role {base!r} is of model family {family!r}; this tool exports the Wan family")
    text_len = cfg.get("pipeline_config", {}).get("text_len", 512)
    if mc.get("path") and Path(mc["path"]).exists():
        with open_wan_checkpoint(mc["path"], num_heads=num_heads) as ck:
            return ck.config, f"models.{base}.path {mc['path']}"
    if mc.get("preset"):
        config = get_preset(mc["preset"]).replace(text_len=text_len)
        if num_heads is not None:
            config = config.replace(num_heads=num_heads)
        return config, f"models.{base}.preset {mc['preset']!r}"
    if tensors is None:
        raise CheckpointError(f"meta.json gives role {base!r} neither a preset nor a reachable path ({mc.get('path')!r})")
    shapes = {k: tuple(v.shape) for k, v in tensors().items()}
    how = "tensor shapes" + (f", num_heads={num_heads}" if num_heads else " (num_heads = dim // 128; else --num-heads)")
    return infer_config(shapes, num_heads).replace(text_len=text_len), how


def read_role(checkpoint, role: str = "student", num_heads: int | None = None) -> tuple:
    """``(state dict {native name: tensor}, WanConfig, meta)`` of a role, fully in memory (for
    sampling; :func:`export_role` streams instead)."""
    step_dir = find_checkpoint(checkpoint)
    meta = read_meta(step_dir)
    tensors = dict(iter_role_state_dict(step_dir, role, meta))
    config, _ = role_config(meta, role, num_heads, lambda: tensors)
    return tensors, config, meta


def export_role(checkpoint, role: str, to: str, dst, dtype=None, overwrite: bool = False, tp: int = 1, pp: int = 1,
                num_heads: int | None = None, max_shard_size="5GB") -> dict:
    """Writes role ``role`` of a training checkpoint as a Wan checkpoint in format ``to`` at ``dst``."""
    from megadistill.checkpoint import check_destination
    from megadistill.models.wan.checkpoint import FORMATS, save_wan_checkpoint

    if to not in FORMATS:
        raise CheckpointError(f"unknown target format {to!r}; choose one of {FORMATS}")
    check_destination(dst, overwrite)
    step_dir = find_checkpoint(checkpoint)
    meta = read_meta(step_dir)
    loaded = {}

    def load_all():  # only when the config must be inferred from shapes
        if not loaded:
            loaded.update(iter_role_state_dict(step_dir, role, meta))
        return loaded
    config, how = role_config(meta, role, num_heads, load_all)
    tensors = loaded or iter_role_state_dict(step_dir, role, meta)  # streamed: one tensor at a time
    summary = save_wan_checkpoint(tensors, dst, format=to, config=config, dtype=dtype, overwrite=overwrite,
                                  role=split_role(role)[0], tp=tp, pp=pp, max_shard_size=max_shard_size)
    summary.update(checkpoint=str(step_dir), step=meta.get("step"), role=role,
                   source=role_source(step_dir, meta, role)[0], config_source=how)
    return summary


def parse_args(argv=None):
    from megadistill.models.wan.checkpoint import FORMATS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="step_XXXXXXXX folder, or a run's output folder (newest)")
    p.add_argument("--role", default="student", help="student | critic | <role>_ema (default student)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast tensors (default: keep)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (megadistill output)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (megadistill output)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, when the run config cannot tell")
    p.add_argument("--max-shard-size", default="5GB", help="largest file of native/diffusers output")
    p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        s = export_role(a.checkpoint, a.role, a.to, a.dst, dtype=a.dtype, overwrite=a.overwrite, tp=a.tp, pp=a.pp,
                        num_heads=a.num_heads, max_shard_size=a.max_shard_size)
    except (CheckpointError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {s['role']} of step {s['step']} ({s['source']}, config from {s['config_source']}) -> "
          f"{s['format']}: {s['tensors']} tensors, {s['bytes'] / 1e9:.3f} GB {s['dtype']}, {len(s['files'])} files, "
          f"{s['seconds']:.1f} s -> {s['dst']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
