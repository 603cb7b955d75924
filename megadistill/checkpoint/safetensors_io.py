"""Reading and streaming-writing safetensors files with plain file I/O.

The safetensors layout is: an unsigned little-endian 64-bit header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
raw little-endian tensor bytes; offsets are relative to the first byte after the header.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page touched while
copying tensors out stays counted in the process' resident set until the handle closes, so
converting a 28 GB checkpoint would show a 28 GB RSS. Here tensors are read with ``pread`` into
fresh buffers (a slice along dim 0 is one read, along a later dim one read per outer row), and
written by appending bytes, so memory stays at one tensor. Files written here load with the
``safetensors`` library itself (the tests check it).
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys

import torch

from .errors import CheckpointError

# safetensors dtype code <-> torch dtype
_CODE_TO_DTYPE = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_TO_CODE = {v: k for k, v in _CODE_TO_DTYPE.items()}
# short names used in manifests and on the command line
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8",
               torch.uint8: "uint8", torch.bool: "bool"}
_NAME_TO_DTYPE = {v: k for k, v in DTYPE_NAMES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # same limit as the safetensors library
_ALIGN = 8  # data section starts 8-byte aligned so readers can map tensors in place

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("megadistill.checkpoint reads raw little-endian bytes; big-endian hosts are unsupported")


def dtype_from_code(code: str) -> torch.dtype:
    try:
        return _CODE_TO_DTYPE[code]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {code!r}; supported: {sorted(_CODE_TO_DTYPE)}") from None


def code_from_dtype(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_TO_CODE[dtype]
    except KeyError:
        raise CheckpointError(f"cannot store dtype {dtype} in safetensors") from None


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    """``"bf16"`` -> torch.bfloat16 (also accepts ``"float32"``-style torch names)."""
    key = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
           "float64": "fp64", "double": "fp64"}.get(str(name), str(name))
    try:
        return _NAME_TO_DTYPE[key]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


def nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class SafetensorsFile:
    """Header of one safetensors file plus positioned reads of (slices of) its tensors.

    The header is validated on open: every tensor's byte range must match its shape and dtype and
    lie inside the file, which catches a truncated download before any tensor is read.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self._parse_header()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _parse_header(self):
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, shorter than the "
                                  "8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{self.path}: not a safetensors file or truncated (header claims {n} bytes, file has {size})")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = {}
        data_size = size - self._data_start
        for name, e in header.items():
            try:
                dtype = dtype_from_code(e["dtype"])
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{self.path}: corrupt header entry for {name!r} ({err})") from None
            if end - begin != nbytes(shape, dtype) or begin < 0:
                raise CheckpointError(
                    f"{self.path}: header entry {name!r} has {end - begin} bytes for shape {list(shape)} {e['dtype']}")
            if end > data_size:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {self._data_start + end} "
                    f"but the file has {size} bytes; re-download or re-convert it")
            self._entries[name] = (dtype, shape, begin)

    def keys(self) -> list:
        return list(self._entries)

    def shape(self, name) -> tuple:
        return self._entries[name][1]

    def dtype(self, name) -> torch.dtype:
        return self._entries[name][0]

    def read(self, name, dim=None, start=None, stop=None) -> torch.Tensor:
        """Tensor ``name``, or only ``[start:stop]`` along ``dim``; reads just those bytes."""
        dtype, shape, begin = self._entries[name]
        if dim is None:
            return self._read_into(torch.empty(shape, dtype=dtype), begin)
        if not 0 <= start <= stop <= shape[dim]:
            raise CheckpointError(f"slice [{start}:{stop}] out of range for dim {dim} of {name!r} {list(shape)}")
        outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1:])
        item = dtype.itemsize
        out_shape = shape[:dim] + (stop - start,) + shape[dim + 1:]
        out = torch.empty(out_shape, dtype=dtype)
        row_in, row_out = shape[dim] * inner * item, (stop - start) * inner * item
        if outer == 1 or row_out == row_in:  # the slice is one contiguous byte range
            return self._read_into(out, begin + start * inner * item)
        flat = out.view(outer, -1)
        for i in range(outer):  # one read per outer row: reads exactly the slice's bytes
            self._read_into(flat[i], begin + i * row_in + start * inner * item)
        return out

    def _read_into(self, out: torch.Tensor, offset: int) -> torch.Tensor:
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        pos, total = 0, len(buf)
        while pos < total:  # preadv may return short counts for very large reads
            got = os.preadv(self._fd, [buf[pos:]], self._data_start + offset + pos)
            if got <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file while reading")
            pos += got
        return out

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class SafetensorsWriter:
    """Appends tensors to one safetensors file without holding them: data is written as tensors
    arrive, in any order, and the header is written last into space reserved up front.

    ``planned`` lists (name, shape, dtype) of every tensor the file will hold; it sizes the
    reserved header (padded with spaces, which JSON readers skip). A tensor may arrive with
    another dtype than planned (the header records the real one).
    """

    # longest dtype code any planned tensor could turn into
    _CODE_WIDTH = max(len(c) for c in _CODE_TO_DTYPE)

    def __init__(self, path, planned, metadata=None):
        self.path = str(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._planned = {name: tuple(shape) for name, shape, _ in planned}
        bound = sum(nbytes(s, torch.float64) for _, s, _ in planned)  # largest possible data size
        self._reserved = self._header_bytes(
            {n: ("X" * self._CODE_WIDTH, s, bound, bound) for n, s in self._planned.items()})
        self._entries = {}
        self._pos = 0
        self._f = open(self.path, "wb")
        self._f.seek(8 + self._reserved)

    def _header_bytes(self, entries) -> int:
        n = len(self._header_json(entries))
        return -(-n // _ALIGN) * _ALIGN  # 8 + header keeps the data section 8-byte aligned

    def _header_json(self, entries) -> bytes:
        h = {"__metadata__": self.metadata}
        for n, (code, shape, b, e) in entries.items():
            h[n] = {"dtype": code, "shape": list(shape), "data_offsets": [b, e]}
        return json.dumps(h, separators=(",", ":")).encode()

    def write(self, name, tensor: torch.Tensor):
        if name not in self._planned or name in self._entries:
            raise CheckpointError(f"{self.path}: tensor {name!r} was not planned for this file or is written twice")
        if tuple(tensor.shape) != self._planned[name]:
            raise CheckpointError(f"{self.path}: {name!r} has shape {list(tensor.shape)}, "
                                  f"planned {list(self._planned[name])}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        size = t.numel() * t.element_size()
        self._entries[name] = (code_from_dtype(t.dtype), tuple(t.shape), self._pos, self._pos + size)
        self._pos += size

    @property
    def complete(self) -> bool:
        return len(self._entries) == len(self._planned)

    def abort(self):
        """Closes the file without a header (the caller deletes the folder)."""
        self._f.close()

    def close(self):
        """Writes the header; every planned tensor must have been written."""
        missing = [n for n in self._planned if n not in self._entries]
        if missing:
            self._f.close()
            raise CheckpointError(f"{self.path}: {len(missing)} planned tensors never written, e.g. {missing[:3]}")
        header = self._header_json(self._entries)
        header += b" " * (self._reserved - len(header))
        self._f.seek(0)
        self._f.write(struct.pack("<Q", len(header)))
        self._f.write(header)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
