"""Count the collectives that :mod:`megadistill.distributed.comm` runs.

    with count_collectives() as counts:
        loss = model(x); loss.backward()
    print(counts.summary())
    counts.calls("all_to_all", "sp"), counts.bytes(group="tp")

Kinds: ``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all``. Groups are named by
their kind in the process grid (``tp``, ``sp``, ``dp_sp``, ...) or by their ranks. Bytes are those
of the local input tensor of each call (``numel * element_size``): the shard for an all-gather,
the full local tensor for an all-reduce, reduce-scatter or all-to-all. Identity calls (group
None or size 1) move nothing and are not counted. Forward and backward collectives both count.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch.distributed as dist

from . import comm
from .grid import get_grid


def group_name(group) -> str:
    if group is None:
        return "none"
    grid = get_grid()
    kind = grid.name_of(group) if grid is not None else None
    if kind is not None:
        return kind
    return "ranks" + ",".join(str(r) for r in dist.get_process_group_ranks(group))


class CollectiveCounts:
    """Calls and bytes per (kind, group name)."""

    def __init__(self):
        self._calls = defaultdict(int)
        self._bytes = defaultdict(int)

    def __call__(self, kind, group, tensor):
        key = (kind, group_name(group))
        self._calls[key] += 1
        self._bytes[key] += tensor.numel() * tensor.element_size()

    def _total(self, table, kind, group):
        return sum(v for (k, g), v in table.items() if kind in (None, k) and group in (None, g))

    def calls(self, kind: str | None = None, group: str | None = None) -> int:
        return self._total(self._calls, kind, group)

    def bytes(self, kind: str | None = None, group: str | None = None) -> int:
        return self._total(self._bytes, kind, group)

    def as_dict(self) -> dict:
        return {f"{k}/{g}": {"calls": c, "bytes": self._bytes[(k, g)]} for (k, g), c in sorted(self._calls.items())}

    def summary(self) -> str:
        if not self._calls:
            return "no collectives"
        rows = [f"{'collective':<16}{'group':<10}{'calls':>8}{'MiB':>12}"]
        for (k, g), c in sorted(self._calls.items()):
            rows.append(f"{k:<16}{g:<10}{c:>8}{self._bytes[(k, g)] / 2**20:>12.3f}")
        rows.append(f"{'total':<26}{self.calls():>8}{self.bytes() / 2**20:>12.3f}")
        return "\n".join(rows)


@contextmanager
def count_collectives():
    """Count every collective run through :mod:`comm` while the block is active."""
    counts = CollectiveCounts()
    comm._observers.append(counts)
    try:
        yield counts
    finally:
        comm._observers.remove(counts)
