"""DeepSpeed ZeRO-3 with our mpu on a tp2 x sp2 grid (4 gloo processes): one SGD step of a
tensor-parallel MLP, each sp rank on its sequence half with the mean loss of its own tokens,
equals the step of the unsharded MLP on the whole sequence, for both ZeRO-3 gradient paths."""
import deepspeed
import torch
import torch.nn as nn
import torch.nn.functional as F

import megadistill.distributed as md

from deepspeed.runtime.zero import GatheredParameters

from _dist_spawn import spawn


class _TPMLP(nn.Module):
    def __init__(self, fc1, fc2, group):
        super().__init__()
        self.col = md.ColumnParallelLinear.from_linear(fc1, group)
        self.row = md.RowParallelLinear.from_linear(fc2, group)

    def forward(self, x):
        return self.row(F.gelu(self.col(x)))


def _deepspeed_worker(rank, world):
    md.initialize(tp=2, sp=2, backend="gloo")
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group initialize() started
    lr = 0.1
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    fc2(F.gelu(fc1(x))).square().mean().backward()  # the whole sequence, one process
    tp_rank = md.get_tp_rank()
    expected = {"col.weight": md.tp_shard(fc1.weight - lr * fc1.weight.grad, 0, tp_rank, 2),
                "col.bias": md.tp_shard(fc1.bias - lr * fc1.bias.grad, 0, tp_rank, 2),
                "row.weight": md.tp_shard(fc2.weight - lr * fc2.weight.grad, 1, tp_rank, 2),
                "row.bias": fc2.bias - lr * fc2.bias.grad}

    for reduce_scatter in (True, False):
        model = _TPMLP(fc1, fc2, md.get_tp_group())
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "reduce_scatter": reduce_scatter},
                  "optimizer": {"type": "SGD", "params": {"lr": lr}}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                          mpu=md.mpu)
        assert engine.dp_world_size == 2 and engine.seq_dp_world_size == 2  # dp x sp
        assert engine.mp_world_size == 2 and engine.sequence_parallel_size == 1
        x_local = x.chunk(2, 1)[md.get_sp_rank()]
        loss = engine(x_local).square().mean()  # mean over this rank's own tokens
        engine.backward(loss)
        engine.step()
        for name, param in engine.module.named_parameters():
            with GatheredParameters([param]):
                torch.testing.assert_close(param.detach(), expected[name].detach(), rtol=1e-5, atol=1e-6,
                                           msg=f"{name} after one step, reduce_scatter={reduce_scatter}")
        engine.destroy()


def test_deepspeed_zero3_with_mpu_tp2_sp2():
    spawn(_deepspeed_worker, 4)
