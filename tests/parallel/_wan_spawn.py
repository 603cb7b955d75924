"""Run a function in N gloo processes with the launcher's environment (RANK, WORLD_SIZE, ...)."""
import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import megadistill.distributed as md
    try:
        fn(rank, world_size, *args)
    finally:
        md.destroy()


def spawn(fn, world_size: int, *args):
    """Run ``fn(rank, world_size, *args)`` (a module-level function) in ``world_size`` processes;
    a failure in any of them raises here with its traceback."""
    mp.start_processes(_entry, args=(fn, world_size, _free_port(), args), nprocs=world_size, join=True,
                       start_method="fork")
