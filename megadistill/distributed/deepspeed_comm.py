"""Start DeepSpeed's communication layer on an existing torch.distributed default group.

On a CPU accelerator, ``deepspeed.init_distributed`` also sets up a shared-memory all-reduce when
every rank is on one host (``LOCAL_SIZE == WORLD_SIZE``, as the ``deepspeed`` launcher sets): each
rank creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (about 64 MiB) and
maps every other rank's. Nothing ever unlinks those names, so each CPU job would leave
``world_size`` buffers in ``/dev/shm`` (RAM) behind it. Once every rank has mapped every buffer, the
names are no longer needed: the mappings outlive the unlink, and the memory is freed when the last
process exits.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def shm_allreduce_buffer_path(rank: int) -> Path:
    """The shared-memory name DeepSpeed's CPU all-reduce gives ``rank`` of the current job."""
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_allreduce_buffer() -> bool:
    """Unlink this rank's shared-memory all-reduce buffer name; True when there was one.

    Collective over the default group: the barrier makes sure no rank is still looking the name up.
    """
    if not dist.is_initialized():
        return False
    if dist.get_world_size() > 1:
        dist.barrier()
    path = shm_allreduce_buffer_path(dist.get_rank())
    if not path.exists():
        return False
    path.unlink(missing_ok=True)
    return True


def init_deepspeed_comm(backend: str | None = None) -> None:
    """``deepspeed.init_distributed`` on the default group, without leaving names in /dev/shm."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend or dist.get_backend())
    release_shm_allreduce_buffer()
