"""Role-based training checkpoints, written atomically.

Layout of one checkpoint::

    <output_dir>/checkpoints/step_00000100/
        meta.json                  step, roles, resolved config; written last, by rank 0
        <role>/                    DeepSpeed engine checkpoint (ZeRO partitions of every rank)
        <role>.safetensors         or, for a plain module: weights (rank 0)
        <role>.optim.pt            and its optimizer / lr-scheduler state (rank 0)
        <role>_stage<s>.*          the same per pipeline stage (pp > 1: each stage's rank)
        ema_<role>.safetensors     EMA weights of a role that keeps one (rank 0), or under ZeRO-3
        ema_<role>_rank<r>.safetensors   each rank's partition of them
        trainer_rank<r>.pt         per-rank trainer state: data position and every RNG state

Every rank writes into ``step_XXXXXXXX.tmp``; after a barrier rank 0 writes ``meta.json`` and
renames the folder. A run killed mid-write leaves only a ``.tmp`` folder, which resume ignores
(and the next save of that step replaces). Everything loads with safetensors or
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step_{step:08d}"


def list_checkpoints(output_dir) -> list:
    """Complete checkpoints (those with meta.json), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir):
    done = list_checkpoints(output_dir)
    return done[-1] if done else None


def resolve_resume(resume, output_dir):
    """``None`` -> None; ``"auto"`` -> newest complete checkpoint in ``output_dir`` or None;
    a path -> that checkpoint (must be complete)."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    p = Path(resume)
    if not (p / "meta.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete megadistill checkpoint "
                                "(no meta.json; a '.tmp' folder is a partial write)")
    return p


# --- RNG state ------------------------------------------------------------------------------------

def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py[0], list(py[1]), py[2]],
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _fault_point(name: str, step: int, rank: int):
    """Fault injection for the kill-and-resume tests: ``MEGADISTILL_FAULT=<name>:<step>:<rank>``
    makes that rank SIGKILL itself at that point of that step's checkpoint write, exactly as a node
    failure would. Unset in normal runs."""
    spec = os.environ.get("MEGADISTILL_FAULT")
    if spec and spec == f"{name}:{step}:{rank}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# --- save / load ----------------------------------------------------------------------------------

def _atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plain_files(stage):
    """(writes plain-module files, file suffix): rank 0 writes whole roles; under pipeline
    parallelism (one rank per stage) every stage's rank writes its slice as ``<role>_stage<s>``."""
    if stage is None:
        return _rank() == 0, ""
    return True, f"_stage{stage}"


def save_training_checkpoint(output_dir, step: int, handles: dict, trainer_state: dict,
                             config_dict: dict | None = None, keep_last: int = 0, stage: int | None = None,
                             num_stages: int = 1) -> Path:
    """Collective: every rank calls it. Returns the final folder. ``stage``: this rank's pipeline
    stage when the roles are stage slices (``num_stages`` > 1)."""
    final = step_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = _rank()
    writes, suffix = _plain_files(stage)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    for name, h in handles.items():
        if not h.trainable:
            continue
        if h.engine is not None:
            h.engine.save_checkpoint(str(tmp / name), tag="state", save_latest=False)
        elif writes:
            save_file({k: v.detach().contiguous().cpu() for k, v in h.module.state_dict().items()},
                      str(tmp / f"{name}{suffix}.safetensors"))
            _atomic_torch_save({"optimizer": h.optimizer.state_dict() if h.optimizer else None,
                                "lr_scheduler": h.lr_scheduler.state_dict() if h.lr_scheduler else None},
                               tmp / f"{name}{suffix}.optim.pt")
        if h.ema is not None and getattr(h.ema, "partitioned", False):
            save_file(h.ema.state_dict(), str(tmp / f"ema_{name}_rank{rank}.safetensors"))
        elif h.ema is not None and writes:
            save_file(h.ema.state_dict(), str(tmp / f"ema_{name}{suffix}.safetensors"))
    _atomic_torch_save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{rank}.pt")
    _fault_point("checkpoint_written", step, rank)
    _barrier()
    if rank == 0:
        meta = {"format": "megadistill-training-checkpoint", "version": 1, "step": step,
                "roles": sorted(n for n, h in handles.items() if h.trainable),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "pipeline_stages": num_stages, "config": config_dict}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_training_checkpoint(path, handles: dict, stage: int | None = None, num_stages: int = 1) -> dict:
    """Restores every trainable role (weights, optimizer, scheduler, EMA) and returns this rank's
    trainer state (its RNG state is restored too). ``stage``/``num_stages`` as for saving."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world_size"] != world or meta.get("pipeline_stages", 1) != num_stages:
        raise ValueError(f"checkpoint {path} was written by {meta['world_size']} ranks in "
                         f"{meta.get('pipeline_stages', 1)} pipeline stage(s), this run has {world} ranks in "
                         f"{num_stages}: resume with the same layout (re-shard offline with tools/export.py)")
    _, suffix = _plain_files(stage)
    for name in meta["roles"]:
        if name not in handles:
            raise KeyError(f"checkpoint {path} has role {name!r}, which this run does not build")
        h = handles[name]
        if h.engine is not None:
            h.engine.load_checkpoint(str(path / name), tag="state", load_module_strict=True)
        else:
            h.module.load_state_dict(load_file(str(path / f"{name}{suffix}.safetensors")))
            opt = torch.load(path / f"{name}{suffix}.optim.pt", weights_only=True)
            if h.optimizer is not None and opt["optimizer"] is not None:
                h.optimizer.load_state_dict(opt["optimizer"])
            if h.lr_scheduler is not None and opt["lr_scheduler"] is not None:
                h.lr_scheduler.load_state_dict(opt["lr_scheduler"])
        if h.ema is not None:
            part = "_rank%d" % _rank() if getattr(h.ema, "partitioned", False) else suffix
            h.ema.load_state_dict(load_file(str(path / f"ema_{name}{part}.safetensors")))
    state = torch.load(path / f"trainer_rank{_rank()}.pt", weights_only=True)
    set_rng_state(state.pop("rng"))
    return state
