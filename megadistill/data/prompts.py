"""Prompt files (one prompt per line) for data-free methods, read as a deterministic, sharded and
resumable stream."""
from __future__ import annotations

from pathlib import Path

import torch


def read_prompts(path) -> list:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} does not exist (data.path; one prompt per line)")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in prompts if x and not x.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {p} holds no prompt (one per line; '#' starts a comment)")
    return prompts


class PromptStream:
    """Endless batches ``{"prompts": [...]}``. Each epoch is a permutation of the prompts drawn from
    ``(seed, epoch)``; data-parallel rank ``r`` of ``world`` takes positions ``r, r+world, ...`` of
    it, so ranks never share a prompt within an epoch and every rank agrees on the order without
    communication. ``state_dict()`` is the exact position; loading it resumes there."""

    def __init__(self, prompts, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(prompts) < world_size:
            raise ValueError(f"{len(prompts)} prompts cannot feed {world_size} data-parallel ranks")
        self.prompts = list(prompts)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = None

    def _epoch_order(self):
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(len(self.prompts), generator=g).tolist()
            self._order = perm[self.rank::self.world_size]
        return self._order

    def __iter__(self):
        return self

    def __next__(self):
        out = []
        while len(out) < self.batch_size:
            order = self._epoch_order()
            if self.position >= len(order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
                continue
            out.append(self.prompts[order[self.position]])
            self.position += 1
        return {"prompts": out}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict):
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
