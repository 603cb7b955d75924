"""The megadistill sharded checkpoint: one safetensors file per (tp rank, pp stage) plus a manifest.

Folder layout::

    manifest.json
    model-tp00-pp00.safetensors   model-tp01-pp00.safetensors   ...
    model-tp00-pp01.safetensors   ...

Each tensor is stored under its full name. A tensor split across tensor parallel ranks along
``split_dim`` is stored as ``tp`` equal parts, part r in file ``model-tp{r}-pp{s}`` for each
pipeline stage s that holds it. A tensor every tp rank holds whole (``split_dim`` null) is stored
ONCE per pipeline stage, in that stage's tp-rank-0 file: tp ranks other than 0 read it from there,
which saves (tp-1) copies of the replicated tensors (for Wan 14B at tp 8 that is ~1.3 G elements
of time projection alone).

``manifest.json``::

    {"format": "megadistill", "version": 1, "role": ..., "model_family": ..., "config": {...},
     "layout": {"tp": T, "pp": P, "stage_blocks": [[lo, hi], ...]}, "dtype": "bf16" | "mixed",
     "files": {file: bytes},
     "tensors": {name: {"shape": [...], "dtype": "bf16", "split_dim": 0 | 1 | null,
                        "shards": [{"file", "tp_rank", "pp_stage", "offset", "length"}]}}}

``offset``/``length`` give the part's range along ``split_dim`` (null for a whole tensor). The
manifest is written last, so a folder without one is not a checkpoint. Reading at another tp size
gathers the wanted range from the overlapping parts (:meth:`ShardedSource.read`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_json_atomic
from .errors import CheckpointError
from .safetensors_io import SafetensorsFile, dtype_from_name, dtype_name
from .sources import tp_slice_bounds
from .writers import FileSetWriter

FORMAT = "megadistill"
VERSION = 1
MANIFEST = "manifest.json"


def shard_file(tp_rank: int, pp_stage: int) -> str:
    return f"model-tp{tp_rank:02d}-pp{pp_stage:02d}.safetensors"


@dataclass(frozen=True)
class Placement:
    """Where one tensor goes: its full shape, stored dtype, tp split dim, and pipeline stages."""
    name: str
    shape: tuple
    dtype: torch.dtype
    split_dim: int | None
    stages: tuple


class ShardedWriter:
    """Streams tensors into a megadistill sharded folder (which should be a fresh temp folder).

    Call :meth:`write` with whole tensors, or :meth:`write_part` with tp parts (lets a caller read
    only one part at a time from its source), then :meth:`close` to write the manifest.
    """

    def __init__(self, folder, placements, tp: int, pp: int, header=None):
        self.folder = Path(folder)
        self.tp, self.pp = tp, pp
        self.header = dict(header or {})
        self.placements = {p.name: p for p in placements}
        plan = {shard_file(r, s): [] for s in range(pp) for r in range(tp)}
        self._shards = {}
        for p in placements:
            if any(not 0 <= s < pp for s in p.stages) or not p.stages:
                raise CheckpointError(f"{p.name}: pipeline stages {p.stages} outside pp={pp}")
            shards = []
            for s in p.stages:
                if p.split_dim is None:
                    plan[shard_file(0, s)].append((p.name, p.shape, p.dtype))
                    shards.append(dict(file=shard_file(0, s), tp_rank=0, pp_stage=s, offset=None, length=None))
                    continue
                for r in range(tp):
                    lo, hi = tp_slice_bounds(p.shape[p.split_dim], r, tp, p.name)
                    part = p.shape[:p.split_dim] + (hi - lo,) + p.shape[p.split_dim + 1:]
                    plan[shard_file(r, s)].append((p.name, part, p.dtype))
                    shards.append(dict(file=shard_file(r, s), tp_rank=r, pp_stage=s, offset=lo, length=hi - lo))
            self._shards[p.name] = shards
        self._files = FileSetWriter(self.folder, plan, metadata={"format": "pt"})
        self._dtypes = {}

    def write(self, name: str, tensor: torch.Tensor):
        p = self._placement(name, tensor.shape)
        if p.split_dim is None:
            self.write_part(name, 0, tensor)
            return
        for r in range(self.tp):
            lo, hi = tp_slice_bounds(p.shape[p.split_dim], r, self.tp, name)
            self.write_part(name, r, tensor.narrow(p.split_dim, lo, hi - lo))

    def write_part(self, name: str, tp_rank: int, part: torch.Tensor):
        """Writes tp rank ``tp_rank``'s part (the whole tensor, rank 0, if it is not split)."""
        p = self._placement(name)
        if p.split_dim is None and tp_rank != 0:
            raise CheckpointError(f"{name} is not split across tp; write it once as tp_rank 0")
        prev = self._dtypes.setdefault(name, part.dtype)
        if prev != part.dtype:
            raise CheckpointError(f"{name}: tp parts written with different dtypes {prev} and {part.dtype}")
        for s in p.stages:
            self._files.write(shard_file(tp_rank, s), name, part)

    def _placement(self, name, shape=None) -> Placement:
        p = self.placements.get(name)
        if p is None:
            raise CheckpointError(f"tensor {name!r} is not part of this checkpoint's plan")
        if shape is not None and tuple(shape) != p.shape:
            raise CheckpointError(f"{name}: shape {list(shape)} does not match planned {list(p.shape)}")
        return p

    def close(self) -> dict:
        """Checks that every part was written and writes ``manifest.json``; returns the manifest."""
        self._files.close()
        names = [dtype_name(d) for d in self._dtypes.values()]
        manifest = {"format": FORMAT, "version": VERSION, **self.header}
        manifest["layout"] = {"tp": self.tp, "pp": self.pp, **manifest.get("layout", {})}
        manifest["dtype"] = names[0] if len(set(names)) == 1 else "mixed"
        manifest["files"] = {f: (self.folder / f).stat().st_size for f in self._files.plan}
        manifest["tensors"] = {
            n: {"shape": list(p.shape), "dtype": dtype_name(self._dtypes[n]), "split_dim": p.split_dim,
                "shards": self._shards[n]} for n, p in self.placements.items()}
        write_json_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return manifest


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST}; not a megadistill checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {m.get('format') if isinstance(m, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    if not isinstance(m.get("version"), int) or m["version"] > VERSION:
        raise CheckpointError(f"{path}: manifest version {m.get('version')!r} is newer than this reader ({VERSION})")
    for key in ("layout", "tensors", "files"):
        if key not in m:
            raise CheckpointError(f"{path}: manifest lacks {key!r}")
    return m


class ShardedSource:
    """Reads a megadistill sharded folder as full tensors or tp slices of any tp size.

    On open, every file is checked (header, size, not truncated) and every tensor's parts are
    checked to be present with the manifest's shape and dtype and to tile the tensor exactly.
    """

    def __init__(self, folder):
        self.path = str(folder)
        self.manifest = read_manifest(folder)
        self._files = {}
        try:
            for f in self.manifest["files"]:
                self._files[f] = SafetensorsFile(Path(folder) / f)
            self._validate()
        except BaseException:
            self.close()
            raise

    def _validate(self):
        for name, e in self.manifest["tensors"].items():
            shape, d = tuple(e["shape"]), e["split_dim"]
            dtype = dtype_from_name(e["dtype"])
            by_stage = {}
            for sh in e["shards"]:
                f = self._files.get(sh["file"])
                if f is None or name not in f.keys():
                    raise CheckpointError(f"{self.path}: {name!r} should be in {sh['file']}, which lacks it")
                want = shape if d is None else shape[:d] + (sh["length"],) + shape[d + 1:]
                if f.shape(name) != want or f.dtype(name) != dtype:
                    raise CheckpointError(f"{self.path}/{sh['file']}: {name!r} is {list(f.shape(name))} "
                                          f"{f.dtype(name)}, manifest says {list(want)} {dtype}")
                by_stage.setdefault(sh["pp_stage"], []).append(sh)
            if not by_stage:
                raise CheckpointError(f"{self.path}: {name!r} has no shards")
            if d is not None:
                for group in by_stage.values():
                    pos = 0
                    for sh in sorted(group, key=lambda x: x["offset"]):
                        if sh["offset"] != pos:
                            raise CheckpointError(f"{self.path}: parts of {name!r} do not tile dim {d}")
                        pos += sh["length"]
                    if pos != shape[d]:
                        raise CheckpointError(f"{self.path}: parts of {name!r} cover {pos} of {shape[d]}")

    def keys(self):
        return list(self.manifest["tensors"])

    def shape(self, name):
        return tuple(self.manifest["tensors"][name]["shape"])

    def dtype(self, name):
        return dtype_from_name(self.manifest["tensors"][name]["dtype"])

    def split_dim(self, name):
        return self.manifest["tensors"][name]["split_dim"]

    def read(self, name, dim=None, start=None, stop=None) -> torch.Tensor:
        """The tensor, or ``[start:stop]`` along ``dim``, gathered from whichever parts overlap it."""
        e = self.manifest["tensors"][name]
        d = e["split_dim"]
        first_stage = min(sh["pp_stage"] for sh in e["shards"])
        shards = sorted((sh for sh in e["shards"] if sh["pp_stage"] == first_stage), key=lambda x: x["offset"] or 0)
        if d is None:
            return self._files[shards[0]["file"]].read(name, dim, start, stop)
        if dim is not None and dim != d:  # a slice across the split: gather whole, then cut
            return self.read(name).narrow(dim, start, stop - start).clone()
        if dim is None:
            start, stop = 0, e["shape"][d]
        parts = []
        for sh in shards:
            lo, hi = max(start, sh["offset"]), min(stop, sh["offset"] + sh["length"])
            if lo < hi:
                parts.append(self._files[sh["file"]].read(name, d, lo - sh["offset"], hi - sh["offset"]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files = {}
