"""Point-to-point transfer of a tuple of tensors between two pipeline stages.

A message is a fixed-size int64 header (tensor count, then dtype code, rank and sizes of each
tensor) followed by the tensors themselves, so the receiver needs no shape knowledge of its own.
Sends are posted with ``isend`` and their buffers kept until :meth:`StageLink.wait_sends`;
receives block. Between one ordered pair of ranks messages arrive in the order they were posted
(gloo and NCCL both keep that order for one tag), which is the order the schedule lists them.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)
_MAX_DIMS = 6
_HEADER = 64  # 1 + 8 per tensor: up to 7 tensors of rank <= 6


def encode_header(tensors) -> torch.Tensor:
    tensors = tuple(tensors)
    if 1 + (2 + _MAX_DIMS) * len(tensors) > _HEADER:
        raise ValueError(f"a pipeline message carries at most {(_HEADER - 1) // (2 + _MAX_DIMS)} tensors, "
                         f"got {len(tensors)}")
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0] = len(tensors)
    for i, t in enumerate(tensors):
        if t.dtype not in _DTYPES or t.dim() > _MAX_DIMS:
            raise ValueError(f"cannot send a tensor of dtype {t.dtype} and rank {t.dim()} between stages "
                             f"(dtypes {_DTYPES}, rank <= {_MAX_DIMS})")
        at = 1 + i * (2 + _MAX_DIMS)
        header[at] = _DTYPES.index(t.dtype)
        header[at + 1] = t.dim()
        header[at + 2:at + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return header


def decode_header(header: torch.Tensor) -> list:
    """[(dtype, shape)] of the tensors a header announces."""
    h = header.tolist()
    specs = []
    for i in range(h[0]):
        at = 1 + i * (2 + _MAX_DIMS)
        specs.append((_DTYPES[h[at]], tuple(h[at + 2:at + 2 + h[at + 1]])))
    return specs


class StageLink:
    """Sends and receives of one pipeline rank to and from the other stages of its pipeline group.

    ``group``: the pipeline process group (None: a single stage, nothing to send); stage ``s`` is
    the ``s``-th rank of the group. ``device``: where received tensors are placed (the header too;
    NCCL needs device tensors)."""

    def __init__(self, group, device=None):
        self.group = group
        self.ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.pending: list = []  # (work, buffers) of posted sends
        self.recv_wait_s = 0.0   # wall time spent blocked in receives (the stage's idle time, mostly)

    def send(self, tensors, dst_stage: int) -> None:
        tensors = tuple(t.detach().contiguous() for t in tensors)
        header = encode_header(tensors).to(self.device)
        dst = self.ranks[dst_stage]
        for t in (header,) + tensors:
            self.pending.append((dist.isend(t, dst=dst, group=self.group), t))

    def recv(self, src_stage: int) -> tuple:
        start = time.perf_counter()
        src = self.ranks[src_stage]
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        dist.irecv(header, src=src, group=self.group).wait()
        out = []
        for dtype, shape in decode_header(header.cpu()):
            t = torch.empty(shape, dtype=dtype, device=self.device)
            dist.irecv(t, src=src, group=self.group).wait()
            out.append(t)
        self.recv_wait_s += time.perf_counter() - start
        return tuple(out)

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
