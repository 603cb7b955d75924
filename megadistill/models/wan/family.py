"""The Wan family's entry points for the builder: models, adapter, synthetic data."""
from __future__ import annotations

import os
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
    holds all of it. Under a process grid with tp or sp > 1 it is parallelized over the grid's groups
    and holds this rank's tp shard (:func:`_build_parallel`)."""
    dtype = _DTYPES[model_cfg.dtype]
    text_len = run_cfg.pipeline_config.text_len
    cls, kwargs = _model_class(model_cfg, run_cfg)
    if _grid_is_parallel():
        model = _build_parallel(model_cfg, text_len, seed, zero3_config, mpu, dtype, cls)
    elif zero3_config is not None:
        model = _build_partitioned(model_cfg, text_len, seed, zero3_config, mpu, dtype, cls, kwargs)
    elif model_cfg.path:
        model = cls.from_pretrained(model_cfg.path, dtype=dtype, **kwargs)
        if model.config.text_len != text_len:
            raise ConfigError("config", "pipeline_config.text_len",
                              f"{text_len} differs from the checkpoint's text_len "
                              f"{model.config.text_len} ({model_cfg.path})")
    else:
        model = init_weights(cls(_preset_config(model_cfg, text_len), **kwargs), seed=seed).to(dtype)
    if model_cfg.realism_head:
        # Added whole after a ZeRO-3 build too: deepspeed.initialize partitions parameters that
        # zero.Init did not (every rank draws the same values from the seed).
        model.add_realism_head(seed).realism_head.to(dtype)
    model.activation_checkpointing = run_cfg.parallel.activation_checkpointing
    return model


def _model_class(model_cfg, run_cfg):
    """``(WanDiT, {})``, or for ``causal: true`` the block-causal DiT with its block size, local window
    (``pipeline_config.local_attn_size`` frames, -1 = none) and attention sinks (``sink_size``)."""
    if not model_cfg.causal:
        return WanDiT, {}
    from .causal import CausalWanDiT

    p = run_cfg.pipeline_config
    window = None if p.local_attn_size == -1 else int(p.local_attn_size)
    if window is not None and window < p.num_frame_per_block:
        raise ConfigError("config", "pipeline_config.local_attn_size",
                          f"{window} frames is less than one block (num_frame_per_block="
                          f"{p.num_frame_per_block}); the window includes the query's own block")
    if p.sink_size and window is None:
        raise ConfigError("config", "pipeline_config.sink_size",
                          f"{p.sink_size} sink frames need a local window; set local_attn_size")
    return CausalWanDiT, {"num_frame_per_block": int(p.num_frame_per_block), "local_window_frames": window,
                          "sink_frames": int(p.sink_size)}


def _preset_config(model_cfg, text_len):
    try:
        return get_preset(model_cfg.preset).replace(text_len=text_len)
    except ValueError as e:
        raise ConfigError("config", "models.*.preset", str(e)) from None


def _build_partitioned(model_cfg, text_len, seed, ds_config, mpu, dtype, cls=WanDiT, kwargs=None):
    from megadistill.distributed.zero import build_partitioned

    kwargs = kwargs or {}
    if not model_cfg.path:
        config = _preset_config(model_cfg, text_len)
        return build_partitioned(lambda: cls(config, **kwargs), ds_config,
                                 lambda name, p: init_value(name, p.ds_shape, seed), mpu=mpu, dtype=dtype)
    from .checkpoint import open_wan_checkpoint

    with open_wan_checkpoint(model_cfg.path) as ckpt:
        if ckpt.config.text_len != text_len:
            raise ConfigError("config", "pipeline_config.text_len",
                              f"{text_len} differs from the checkpoint's text_len "
                              f"{ckpt.config.text_len} ({model_cfg.path})")
        return build_partitioned(lambda: cls(ckpt.config, **kwargs), ds_config,
                                 lambda name, p: ckpt.load(name), mpu=mpu, dtype=dtype)



# --- tensor / Ulysses sequence parallel roles --------------------------------------------------------

def _grid_is_parallel() -> bool:
    from megadistill import distributed as md

    return md.is_initialized() and (md.get_tp_size() > 1 or md.get_sp_size() > 1)


def _build_parallel(model_cfg, text_len, seed, ds_config, mpu, dtype, cls):
    """A role for a grid with tp or sp > 1: the DiT parallelized over the grid's tp and sp groups
    (:func:`megadistill.models.wan.parallel.parallelize_wan`) holding this rank's tp shard of the
    weights the single-process build would hold. With ``ds_config`` (ZeRO-3) the shard is also
    partitioned over the data-parallel group dp x sp (:func:`_partition_parallel`)."""
    from .checkpoint import open_wan_checkpoint
    from .parallel import mark_tensor_parallel_parameters, parallelize_from_grid

    if cls is not WanDiT:
        raise ConfigError("config", "parallel", "tensor / sequence parallel training is implemented for the "
                          "bidirectional Wan DiT only; set parallel.tp and parallel.sp to 1 for causal models")
    if not model_cfg.path:
        config = _preset_config(model_cfg, text_len)
        if ds_config is None:
            model = init_weights(WanDiT(config), seed=seed).to(dtype)
            return mark_tensor_parallel_parameters(parallelize_from_grid(model))
        return _partition_parallel(config, _preset_shard_fill(config, seed), ds_config, mpu, dtype)
    with open_wan_checkpoint(model_cfg.path) as ckpt:
        if ckpt.config.text_len != text_len:
            raise ConfigError("config", "pipeline_config.text_len",
                              f"{text_len} differs from the checkpoint's text_len "
                              f"{ckpt.config.text_len} ({model_cfg.path})")
        if ds_config is None:
            return WanDiT.from_pretrained(model_cfg.path, dtype=dtype)  # reads this rank's tp shard
        return _partition_parallel(ckpt.config, _checkpoint_shard_fill(ckpt), ds_config, mpu, dtype)


def _tp_coords():
    from megadistill import distributed as md

    return md.get_tp_rank(), md.get_tp_size()


def _preset_shard_fill(config, seed):
    """``fill(name) ->`` this tp rank's slice of :func:`init_value` drawn at the FULL shape, so every
    layout starts from the single-process weights."""
    from megadistill.distributed.layers import tp_shard

    from .keys import tp_split_dim
    from .loading import build_on_meta

    full_shapes = {n: tuple(p.shape) for n, p in build_on_meta(WanDiT, config).named_parameters()}
    rank, size = _tp_coords()

    def fill(name):
        value = init_value(name, full_shapes[name], seed)
        split = tp_split_dim(name)
        return value if split is None or size == 1 else tp_shard(value, split, rank, size)
    return fill


def _checkpoint_shard_fill(ckpt):
    from .keys import tp_split_dim

    rank, size = _tp_coords()
    return lambda name: ckpt.load(name, tp_rank=rank, tp_size=size) if tp_split_dim(name) is not None \
        else ckpt.load(name)


def _partition_units(model):
    """The pieces materialized and partitioned one at a time: every block, every other top-level
    child. The largest is one block's tp shard."""
    for name, child in model.named_children():
        if name == "blocks":
            yield from ((f"blocks.{i}", block) for i, block in enumerate(child))
        else:
            yield name, child


def _partition_parallel(config, fill, ds_config, mpu, dtype):
    """ZeRO-3 build of a tp/sp-parallel DiT, never holding more than one block's tp shard unpartitioned.

    The model is built on the meta device and parallelized there (tp layers get their local
    shapes). Then, one unit at a time (:func:`_partition_units`), it is given storage, filled by
    rank 0 of the data-parallel group (dp x sp; the ranks that share this tp shard) and handed to
    ``deepspeed.zero.Init(module=...)``, which broadcasts it from that rank and partitions it over
    the same group. ``deepspeed.zero.Init`` used as a context would partition over the world group
    and mix the shards of different tp ranks."""
    import deepspeed
    import torch.distributed as dist

    from megadistill.distributed.zero import init_config_for_dtype

    from .loading import build_on_meta
    from .parallel import mark_tensor_parallel_parameters, parallelize_from_grid

    group = mpu.get_data_parallel_group()
    filler = dist.get_rank(group) == 0
    # Init(module=...) would otherwise replace torch.nn.functional.linear for the rest of the process.
    init_config = init_config_for_dtype(ds_config, dtype)
    init_config["zero_optimization"] = {**ds_config.get("zero_optimization", {}), "memory_efficient_linear": False}
    model = parallelize_from_grid(build_on_meta(WanDiT, config))
    for prefix, unit in _partition_units(model):
        unit.to_empty(device="cpu").to(dtype)
        if filler:
            with torch.no_grad():
                for name, p in unit.named_parameters():
                    p.copy_(fill(f"{prefix}.{name}").to(dtype))
        deepspeed.zero.Init(module=unit, config_dict_or_path=init_config, mpu=mpu, data_parallel_group=group)
    return mark_tensor_parallel_parameters(model)


_TINY_ENCODERS = {}
# Named tiny encoders: relative-position bias scale of each (see build_tiny_text_encoder).
TINY_TEXT_ENCODERS = {"tiny": 1.0, "tiny-positional": 10.0}


def parse_tiny_text_encoder(spec: str):
    """``"tiny"``, ``"tiny-positional"``, optionally ``":SEED"`` -> (relative_bias_scale, seed), or None
    for a value that names no tiny encoder (a path)."""
    name, _, seed = spec.partition(":")
    if name not in TINY_TEXT_ENCODERS:
        if name.startswith("tiny") and not os.path.exists(spec):
            raise ConfigError("config", "pipeline_config.text_encoder",
                              f"{spec!r}: unknown tiny text encoder and no such folder; use one of "
                              f"{sorted(TINY_TEXT_ENCODERS)} (optionally with ':SEED') or an encoder folder")
        return None
    if seed and not seed.isdigit():
        raise ConfigError("config", "pipeline_config.text_encoder",
                          f"{spec!r}: the seed after ':' must be a non-negative integer, e.g. {name + ':1'!r}")
    return TINY_TEXT_ENCODERS[name], int(seed or 0)


def load_text_encoder(spec, device, text_len: int = 512, text_dim: int = 4096):
    """``"tiny"`` / ``"tiny-positional"`` (optionally ``":SEED"``): a deterministic tiny UMT5 +
    sentencepiece encoder, built in a temporary folder (``-positional``: relative-position tables x10,
    the encoder of the shipped tiny teacher); any other value: a folder or file
    ``WanTextEncoder.from_pretrained`` reads."""
    from .text_encoder import WanTextEncoder

    if spec is None:
        return None
    tiny = parse_tiny_text_encoder(spec)
    if tiny is not None:
        from .tokenizer_utils import build_tiny_text_encoder

        scale, seed = tiny
        key = (scale, seed, text_len, text_dim)
        if key not in _TINY_ENCODERS:
            with tempfile.TemporaryDirectory() as d:
                root = build_tiny_text_encoder(d, d_model=text_dim, seed=seed, relative_bias_scale=scale)
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
    from megadistill.config.schema import SYNTHETIC_WORLD_SEED
    from megadistill.data.synthetic import SyntheticLatentStream, SyntheticVideoWorld

    c, f, h, w = run_cfg.pipeline_config.latent_shape
    # The world (the dataset) keeps its own seed; training.seed only picks the clips drawn from it.
    world = SyntheticVideoWorld(**{"seed": SYNTHETIC_WORLD_SEED, **run_cfg.data.world},
                                channels=c, frames=f, height=h, width=w)
    return SyntheticLatentStream(world, run_cfg.training.micro_batch_size, seed=run_cfg.training.seed,
                                 rank=rank, world_size=world_size)
