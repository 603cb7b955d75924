"""dp2 x sp2 with DeepSpeed ZeRO-3 (4 gloo processes): the trainer's path, each rank on its own
samples (dp) and its own token chunk (Ulysses sp) with the loss of its own tokens, equals one
process on the whole batch: forward output, every parameter's full gradient and one AdamW step."""
import math

import torch

import megadistill.distributed as md
from megadistill.models.wan.parallel import (chunk_bounds, gather_chunks, local_chunk, parallelize_wan, patchify,
                                             patchify_output)

from _wan_reference import ADAMW, SHAPES, assert_close, make_inputs, reference_step, tiny_model
from _dist_spawn import spawn


def _zero3_worker(rank, world):
    import deepspeed
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_get_full_grad

    md.initialize(sp=2)  # world 4: dp 2 x sp 2
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group initialize() started
    dp, sp = md.get_dp_size(), md.get_sp_size()
    sp_group = md.get_sp_group()
    model = tiny_model()
    patch = model.config.patch_size

    # 4 samples: dp rank d takes samples [2d, 2d + 2); 9 tokens per sample split 5 + 4(+1 padding)
    b, f, h, w = SHAPES["odd"]
    x, t, text, weight = make_inputs((2 * b, f, h, w), per_frame=True)
    ref = reference_step(model, x, t, text, weight)  # loss = sum(out * weight) / 4
    mine = slice(md.get_dp_rank() * b, (md.get_dp_rank() + 1) * b)

    # WanDiT.embed_time reads the time-path weights without calling their modules; DeepSpeed 0.19's
    # ZeRO-3 gathers them on access (checked here: every parameter is partitioned, none persists).
    par = parallelize_wan(model, sp_group=sp_group)
    config = {"train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": 1,
              # partition every parameter, however small (tiny ones would otherwise stay whole)
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
              "gradient_clipping": 0.0}  # DeepSpeed 0.19 clips to norm 1.0 unless told otherwise
    engine, *_ = deepspeed.initialize(model=par, optimizer=torch.optim.AdamW(par.parameters(), **ADAMW),
                                      config=config, mpu=md.mpu)
    assert engine.dp_world_size == dp * sp == 4
    assert all(p.data.numel() == 0 for p in engine.module.parameters())  # all partitioned

    grid = par.token_grid(x)
    tokens = local_chunk(patchify(x[mine], patch), sp_group)
    out = engine(tokens, t[mine], text[mine], grid=grid)  # this rank's chunk of output tokens
    with torch.no_grad():
        full = par.unpatchify(gather_chunks(out, math.prod(grid), sp_group), grid)
    assert_close(full, ref.out[mine], "dp2 x sp2 ZeRO-3 forward")
    _, n, valid = chunk_bounds(math.prod(grid), md.get_sp_rank(), sp)
    assert out.shape[1] == n and valid == (5 if md.get_sp_rank() == 0 else 4)

    # This rank's share of the loss: its samples' weights on its own tokens (padding rows weigh 0),
    # times dp * sp because DeepSpeed averages the gradients over dp x sp.
    w_local = local_chunk(patchify_output(weight[mine], patch), sp_group)
    loss = (out * w_local).sum() / (2 * b) * (dp * sp)
    engine.backward(loss)
    for name, p in engine.module.named_parameters():
        assert_close(safe_get_full_grad(p), ref.grads[name], f"ZeRO-3 d{name}")
    engine.step()
    for name, p in engine.module.named_parameters():
        with GatheredParameters([p]):
            assert p.numel() > 0
            assert_close(p.detach(), ref.updated[name], f"ZeRO-3 {name} after AdamW")
    engine.destroy()


def test_dp2_sp2_zero3_matches_single_process():
    spawn(_zero3_worker, 4)
