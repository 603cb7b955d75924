"""DeepSpeed's CPU shared-memory all-reduce must not leave its buffers in /dev/shm after a job."""
import os

import pytest
import torch

from _dist_spawn import spawn

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a /dev/shm")


def _start_and_release(rank, world_size):
    import torch.distributed as dist

    import megadistill.distributed as md
    from megadistill.distributed.deepspeed_comm import init_deepspeed_comm, shm_allreduce_buffer_path

    os.environ["LOCAL_SIZE"] = str(world_size)  # as the deepspeed launcher sets it: all ranks on one host
    md.initialize(backend="gloo")
    import deepspeed.comm as ds_comm

    init_deepspeed_comm("gloo")
    dist.barrier()
    left = [str(shm_allreduce_buffer_path(r)) for r in range(world_size) if shm_allreduce_buffer_path(r).exists()]
    assert not left, f"shared-memory buffers left behind: {left}"
    # DeepSpeed's communication still works once the names are gone (it keeps its mappings).
    x = torch.full((4,), float(rank + 1))
    ds_comm.all_reduce(x)
    assert torch.equal(x, torch.full((4,), float(sum(range(1, world_size + 1)))))


def test_init_deepspeed_comm_leaves_no_shm_buffers():
    spawn(_start_and_release, 2)


def _buffer_created_by_plain_init(rank, world_size, out):
    import deepspeed

    import megadistill.distributed as md
    from megadistill.distributed.deepspeed_comm import release_shm_allreduce_buffer, shm_allreduce_buffer_path

    os.environ["LOCAL_SIZE"] = str(world_size)
    md.initialize(backend="gloo")
    deepspeed.init_distributed(dist_backend="gloo")
    path = shm_allreduce_buffer_path(rank)
    existed = path.exists()
    released = release_shm_allreduce_buffer()
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{int(existed)} {int(released)} {int(path.exists())}")


def test_plain_deepspeed_init_creates_the_buffer_release_removes_it(tmp_path):
    """Guards the premise: without the release, DeepSpeed does leave a named buffer per rank."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        pytest.skip("DeepSpeed's shared-memory all-reduce exists on the CPU accelerator only")
    spawn(_buffer_created_by_plain_init, 2, str(tmp_path / "r"))
    for rank in range(2):
        assert (tmp_path / f"r.{rank}").read_text() == "1 1 0"
