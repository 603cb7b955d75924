"""A role built under ZeRO-3 (partitioned from construction, filled tensor by tensor) holds exactly
the weights of the plainly built model, both from a preset init and from a checkpoint; the
partitioned EMA gathers back to the plain EMA."""

import torch

from _dist_spawn import spawn

DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
      "zero_optimization": {"stage": 3}}


def _worker(rank, world, ckpt_dir):
    import megadistill.distributed as md
    from megadistill.distributed.deepspeed_comm import init_deepspeed_comm
    from megadistill.distributed.zero import build_partitioned, gathered_state_dict
    from megadistill.models.wan import WanDiT, get_preset, init_weights
    from megadistill.models.wan.checkpoint import open_wan_checkpoint
    from megadistill.models.wan.dit import init_value
    from megadistill.train.ema import PartitionedEMA

    md.initialize(backend="gloo")
    init_deepspeed_comm("gloo")
    # As on a CPU whose oneDNN has no fp16 (AVX2-only x86), where DeepSpeed's Init turns an explicit
    # dtype=float32 into bfloat16 (megadistill.distributed.zero.init_config_for_dtype): the build must
    # stay float32 on every CPU.
    from deepspeed.accelerator import get_accelerator
    get_accelerator().is_fp16_supported = lambda: None
    cfg = get_preset("tiny")
    plain = init_weights(WanDiT(cfg), seed=7)
    part = build_partitioned(lambda: WanDiT(cfg), DS, lambda n, p: init_value(n, p.ds_shape, 7), mpu=md.mpu)
    assert all(p.numel() == 0 for p in part.parameters())  # no rank holds a full tensor
    assert {p.ds_tensor.dtype for p in part.parameters()} == {torch.float32}
    full = gathered_state_dict(part)
    for name, p in plain.named_parameters():
        assert torch.equal(full[name], p), name

    with open_wan_checkpoint(ckpt_dir) as ckpt:
        loaded = build_partitioned(lambda: WanDiT(ckpt.config), DS, lambda n, p: ckpt.load(n), mpu=md.mpu)
    for name, p in plain.named_parameters():
        assert torch.equal(gathered_state_dict(loaded)[name], p), name

    ema = PartitionedEMA(part, decay=0.5, start_step=0)
    with torch.no_grad():
        for p in part.parameters():
            p.ds_tensor.mul_(3.0)
    ema.update(0)  # shadow = 0.5 * w + 0.5 * 3w = 2w
    averaged = ema.full_state_dict()
    for name, p in plain.named_parameters():
        assert torch.allclose(averaged[name], 2 * p), name


def test_partitioned_build_equals_plain(tmp_path):
    from megadistill.models.wan import WanDiT, get_preset, init_weights

    init_weights(WanDiT(get_preset("tiny")), seed=7).save_pretrained(tmp_path / "ckpt", format="native")
    spawn(_worker, 2, str(tmp_path / "ckpt"))


def test_init_config_states_the_dtype():
    from megadistill.distributed.zero import init_config_for_dtype

    ds = {"zero_optimization": {"stage": 3}, "bfloat16": {"enabled": True}}
    fp32 = init_config_for_dtype(ds, None)
    assert fp32["bf16"] == {"enabled": False} and fp32["fp16"] == {"enabled": False} and "bfloat16" not in fp32
    assert fp32["zero_optimization"] == {"stage": 3} and ds["bfloat16"] == {"enabled": True}  # a copy
    assert init_config_for_dtype(ds, torch.bfloat16)["bf16"]["enabled"]
    half = init_config_for_dtype({"fp16": {"enabled": False, "loss_scale": 0}}, torch.float16)
    assert half["fp16"] == {"enabled": True, "loss_scale": 0} and not half["bf16"]["enabled"]
    import pytest
    with pytest.raises(ValueError, match="float64"):
        init_config_for_dtype(ds, torch.float64)
