"""Streaming writers that spread tensors over several safetensors files.

:class:`FileSetWriter` routes each (file, name, tensor) to its file, opening a file on its first
tensor and finishing it on its last, so memory holds one tensor at a time whatever the order of
arrival. :class:`SizeShardedWriter` builds on it for the Hugging Face layout: files of at most
``max_shard_size`` bytes named ``{base}-0000i-of-0000N.safetensors`` plus a
``{base}.safetensors.index.json`` weight map, or one ``{base}.safetensors`` when it fits.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .atomic import write_json_atomic
from .errors import CheckpointError
from .safetensors_io import SafetensorsWriter, nbytes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (10**9, as Hugging Face counts) or ``"512MiB"``."""
    if isinstance(size, int):
        return size
    m = _SIZE_RE.match(str(size))
    if not m:
        raise CheckpointError(f"cannot read size {size!r}; write e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


class FileSetWriter:
    """Writes planned tensors into a set of safetensors files inside ``folder``.

    ``plan`` maps file name -> list of (tensor name, shape, dtype) that file will hold.
    """

    def __init__(self, folder, plan: dict, metadata=None):
        self.folder = Path(folder)
        self.plan = plan
        self.metadata = metadata
        self._open = {}
        self._done = set()
        self.bytes_written = 0
        for file, entries in plan.items():  # a file with nothing planned is complete at once
            if not entries:
                SafetensorsWriter(self.folder / file, [], metadata).close()
                self._done.add(file)

    def write(self, file: str, name: str, tensor):
        if file in self._done:
            raise CheckpointError(f"{file} is already complete; {name!r} was not planned for it")
        w = self._open.get(file)
        if w is None:
            if file not in self.plan:
                raise CheckpointError(f"no file {file!r} in the write plan")
            w = self._open[file] = SafetensorsWriter(self.folder / file, self.plan[file], self.metadata)
        w.write(name, tensor)
        self.bytes_written += tensor.numel() * tensor.element_size()
        if w.complete:
            w.close()
            del self._open[file]
            self._done.add(file)

    def close(self):
        """Checks that every planned file was completed."""
        missing = [f for f in self.plan if f not in self._done]
        for w in self._open.values():
            w.abort()
        self._open.clear()
        if missing:
            raise CheckpointError(f"write plan not finished: files {missing[:3]} are incomplete")


def split_by_size(entries, max_bytes: int) -> list:
    """Groups (name, shape, dtype) entries, in order, into runs of at most ``max_bytes``
    (a single tensor larger than that gets a file of its own)."""
    groups, cur, cur_bytes = [], [], 0
    for e in entries:
        b = nbytes(e[1], e[2])
        if cur and cur_bytes + b > max_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(e)
        cur_bytes += b
    if cur or not groups:
        groups.append(cur)
    return groups


class SizeShardedWriter:
    """Hugging Face style size-sharded safetensors files with an index when there are several."""

    def __init__(self, folder, base: str, entries, max_shard_size="5GB", metadata=None):
        self.folder = Path(folder)
        self.base = base
        groups = split_by_size(list(entries), parse_size(max_shard_size))
        n = len(groups)
        names = [f"{base}.safetensors"] if n == 1 else [
            f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files = names
        self._file_of = {e[0]: f for f, g in zip(names, groups) for e in g}
        self._set = FileSetWriter(folder, dict(zip(names, groups)), metadata)

    def write(self, name, tensor):
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name!r} is not part of this checkpoint's plan")
        self._set.write(self._file_of[name], name, tensor)

    @property
    def bytes_written(self):
        return self._set.bytes_written

    def close(self):
        self._set.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self._set.bytes_written}, "weight_map": self._file_of}
            write_json_atomic(self.folder / f"{self.base}.safetensors.index.json", json.dumps(index, indent=2) + "\n")
