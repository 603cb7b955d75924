"""Tensor sources: named tensors on disk, read one (slice) at a time.

A source answers ``keys()``, ``shape(name)``, ``dtype(name)`` from file headers alone and reads a
tensor, or a ``[start:stop]`` slice of it along one dim, only when asked. Safetensors files
(:class:`SafetensorsFile`), ``torch.save`` files (:class:`TorchFileSource`) and several files seen
as one (:class:`MultiSource`) share that interface.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError
from .safetensors_io import SafetensorsFile

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def tp_slice_bounds(size: int, tp_rank: int, tp_size: int, name: str = "") -> tuple:
    """[start, stop) of tp rank ``tp_rank``'s equal share of ``size`` entries."""
    if not 0 <= tp_rank < tp_size:
        raise CheckpointError(f"tp_rank={tp_rank} is outside tp_size={tp_size}")
    if size % tp_size:
        raise CheckpointError(f"{name or 'tensor'}: size {size} along its split dim is not divisible by tp={tp_size}")
    per = size // tp_size
    return tp_rank * per, (tp_rank + 1) * per


class TorchFileSource:
    """A flat ``{name: tensor}`` dict saved with ``torch.save``; loaded with
    ``torch.load(weights_only=True, mmap=True)`` so tensors stay on disk until read (nothing but
    tensors and plain containers is unpickled).

    Pages of a memory-mapped file count in the resident set once read, so after every
    ``remap_bytes`` read the file is mapped afresh (the old mapping is released), which bounds that
    growth. Legacy (pre-zipfile) files cannot be mapped and are loaded whole.
    """

    remap_bytes = 1 << 30

    def __init__(self, path):
        self.path = str(path)
        self._sd, self.mapped = self._load()
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self._sd.items()):
            raise CheckpointError(f"{self.path}: expected a flat {{name: tensor}} state dict, found "
                                  f"{list(self._sd)[:5]}; extract the model's state dict first")
        self._meta = {k: (tuple(v.shape), v.dtype) for k, v in self._sd.items()}
        self._read_since_map = 0

    def _load(self):
        try:
            sd, mapped = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (pre-zipfile) files cannot be memory-mapped
                raise self._error(e) from None
            try:
                sd, mapped = torch.load(self.path, map_location="cpu", weights_only=True), False
            except Exception as e2:
                raise self._error(e2) from None
        except Exception as e:  # truncated zip, pickle refusing a non-tensor object, ...
            raise self._error(e) from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{self.path}: expected a flat {{name: tensor}} state dict, found "
                                  f"{type(sd).__name__}")
        return sd, mapped

    def _error(self, e):
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return CheckpointError(f"{self.path}: cannot load with torch.load(weights_only=True): {first}")

    def keys(self):
        return list(self._meta)

    def shape(self, name):
        return self._meta[name][0]

    def dtype(self, name):
        return self._meta[name][1]

    def read(self, name, dim=None, start=None, stop=None):
        if self.mapped and self._read_since_map > self.remap_bytes:
            self._sd = None  # drops the old mapping (returned tensors are copies)
            self._sd, _ = self._load()
            self._read_since_map = 0
        t = self._sd[name]
        if dim is not None:
            t = t.narrow(dim, start, stop - start)
        out = t.clone(memory_format=torch.contiguous_format)  # own memory, not the file mapping
        self._read_since_map += out.numel() * out.element_size()
        return out

    def close(self):
        self._sd = {}


class MultiSource:
    """Several sources seen as one; a name may live in only one of them."""

    def __init__(self, sources):
        self.sources = list(sources)
        self._where = {}
        for src in self.sources:
            for k in src.keys():
                if k in self._where:
                    raise CheckpointError(f"tensor {k!r} appears in both {self._where[k].path} and {src.path}")
                self._where[k] = src

    def keys(self):
        return list(self._where)

    def path_of(self, name):
        return self._where[name].path

    def shape(self, name):
        return self._where[name].shape(name)

    def dtype(self, name):
        return self._where[name].dtype(name)

    def read(self, name, dim=None, start=None, stop=None):
        return self._where[name].read(name, dim, start, stop)

    def close(self):
        for s in self.sources:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_file(path):
    """One weight file as a source, chosen by suffix."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    if p.name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsFile(p)
    if p.name.endswith(TORCH_SUFFIXES):
        return TorchFileSource(p)
    raise CheckpointError(f"{p}: unknown weight file type; expected one of {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}")


def collect_weight_files(folder, prefix: str = "") -> tuple:
    """``(files, index_path or None)``: the weight files of the model in ``folder``.

    Preference: a ``*.safetensors.index.json`` weight map (its files); else the safetensors files
    whose name starts with ``prefix`` (other models' files, e.g. a text encoder next to a DiT, are
    left out), else every safetensors file; then the same for torch files. ``files`` is [] if none.
    """
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if prefix and len(indexes) > 1:
        indexes = [p for p in indexes if p.name.startswith(prefix)] or indexes
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several weight index files {[p.name for p in indexes]}; keep one")
    if indexes:
        return index_files(indexes[0]), indexes[0]
    for suffixes in (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))
        preferred = [p for p in files if prefix and p.name.startswith(prefix)]
        if preferred or files:
            return preferred or files, None
    return [], None


def index_files(index_path) -> list:
    """Shard files named by a ``*.index.json`` weight map; checks they exist."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a weight index (expected a 'weight_map'): {e}") from None
    files = [index_path.parent / f for f in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: lists shard files that do not exist: {missing[:5]}")
    return files


def open_files(paths, index_path=None) -> MultiSource:
    """Opens weight files as one source; with an index, checks each tensor sits where it says."""
    srcs = []
    try:
        for p in paths:
            srcs.append(open_file(p))
        src = MultiSource(srcs)
    except BaseException:
        for s in srcs:
            s.close()
        raise
    if index_path is not None:
        weight_map = json.loads(Path(index_path).read_text())["weight_map"]
        wrong = [k for k, f in weight_map.items() if k not in src._where or Path(src.path_of(k)).name != f]
        if wrong:
            src.close()
            raise CheckpointError(f"{index_path}: {len(wrong)} tensors are not in the shard the index names, "
                                  f"e.g. {wrong[:3]}")
    return src
