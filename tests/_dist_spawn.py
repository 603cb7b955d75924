"""Run a function in N processes with the launcher's environment (RANK, WORLD_SIZE, ...); the
workers call ``md.initialize(..., backend="gloo")`` so the tests run on CPU even where CUDA exists."""
import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import megadistill.distributed as md
    md.destroy()  # a forked child must not inherit the parent's (single-process) grid
    try:
        fn(rank, world_size, *args)
    finally:
        md.destroy()


def spawn(fn, world_size: int, *args):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; a failure in any of them
    raises here with its traceback. ``fn`` must be a module-level function.

    Processes are forked (start-up is then ~0.1 s instead of seconds of re-importing torch), unless
    CUDA is already initialized here, which a forked child cannot use."""
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True,
                       start_method=method)
