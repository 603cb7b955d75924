"""The Wan family's entry points for the builder: models, adapter, synthetic data."""
from __future__ import annotations

import tempfile

import torch

from megadistill.config import ConfigError

from .config import get_preset
from .dit import WanDiT, init_value, init_weights

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(model_cfg, run_cfg, seed: int, zero3_config: dict | None = None, mpu=None):
    """A role's DiT: loaded from ``path`` (any Wan format), or a preset with a deterministic random
    init (the same on every rank, so data-parallel replicas start equal). With ``zero3_config`` the
    model is built partitioned under ``deepspeed.zero.Init`` and filled tensor by tensor, so no rank
    holds all of it."""
    dtype = _DTYPES[model_cfg.dtype]
    text_len = run_cfg.pipeline_config.text_len
    if model_cfg.causal:
        raise ConfigError("config", "models.*.causal", "the causal Wan DiT is not available yet")
    if zero3_config is not None:
        model = _build_partitioned(model_cfg, text_len, seed, zero3_config, mpu, dtype)
    elif model_cfg.path:
        model = WanDiT.from_pretrained(model_cfg.path, dtype=dtype)
        if model.config.text_len != text_len:
            raise ConfigError("config", "pipeline_config.text_len",
                              f"{text_len} differs from the checkpoint's text_len "
                              f"{model.config.text_len} ({model_cfg.path})")
    else:
        model = init_weights(WanDiT(_preset_config(model_cfg, text_len)), seed=seed).to(dtype)
    model.activation_checkpointing = run_cfg.parallel.activation_checkpointing
    return model


def _preset_config(model_cfg, text_len):
    try:
        return get_preset(model_cfg.preset).replace(text_len=text_len)
    except ValueError as e:
        raise ConfigError("config", "models.*.preset", str(e)) from None


def _build_partitioned(model_cfg, text_len, seed, ds_config, mpu, dtype):
    from megadistill.distributed.zero import build_partitioned

    if not model_cfg.path:
        config = _preset_config(model_cfg, text_len)
        return build_partitioned(lambda: WanDiT(config), ds_config,
                                 lambda name, p: init_value(name, p.ds_shape, seed), mpu=mpu, dtype=dtype)
    from .checkpoint import open_wan_checkpoint

    with open_wan_checkpoint(model_cfg.path) as ckpt:
        if ckpt.config.text_len != text_len:
            raise ConfigError("config", "pipeline_config.text_len",
                              f"{text_len} differs from the checkpoint's text_len "
                              f"{ckpt.config.text_len} ({model_cfg.path})")
        return build_partitioned(lambda: WanDiT(ckpt.config), ds_config,
                                 lambda name, p: ckpt.load(name), mpu=mpu, dtype=dtype)


_TINY_ENCODERS = {}


def load_text_encoder(spec, device, text_len: int = 512, text_dim: int = 4096):
    """``"tiny"`` (or ``"tiny:SEED"``): the deterministic tiny UMT5 + sentencepiece encoder, built in a
    temporary folder; any other value: a folder or file ``WanTextEncoder.from_pretrained`` reads."""
    from .text_encoder import WanTextEncoder

    if spec is None:
        return None
    if spec.startswith("tiny"):
        from .tokenizer_utils import build_tiny_text_encoder

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        key = (seed, text_len, text_dim)
        if key not in _TINY_ENCODERS:
            with tempfile.TemporaryDirectory() as d:
                root = build_tiny_text_encoder(d, d_model=text_dim, seed=seed)
                _TINY_ENCODERS[key] = WanTextEncoder.from_pretrained(root, device="cpu", text_len=text_len)
        return _TINY_ENCODERS[key].to(device)
    return WanTextEncoder.from_pretrained(spec, device=device, text_len=text_len)


def build_adapter(run_cfg, device, models: dict):
    from megadistill.diffusion import FlowMatchScheduler

    from .adapter import WanAdapter

    p = run_cfg.pipeline_config
    text_dim = next(iter(models.values())).config.text_dim
    encoder = load_text_encoder(p.text_encoder, device, text_len=p.text_len, text_dim=text_dim)
    scheduler = FlowMatchScheduler(num_train_timesteps=p.num_train_timesteps, shift=p.flow_shift)
    return WanAdapter(text_encoder=encoder, scheduler=scheduler, latent_shape=tuple(p.latent_shape),
                      device=device)


def build_synthetic_stream(run_cfg, rank: int, world_size: int):
    from megadistill.data.synthetic import SyntheticLatentStream, SyntheticVideoWorld

    c, f, h, w = run_cfg.pipeline_config.latent_shape
    world = SyntheticVideoWorld(channels=c, frames=f, height=h, width=w, seed=run_cfg.training.seed)
    return SyntheticLatentStream(world, run_cfg.training.micro_batch_size, seed=run_cfg.training.seed,
                                 rank=rank, world_size=world_size)
