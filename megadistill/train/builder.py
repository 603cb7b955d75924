"""One builder: run config -> process grid, role handles (DeepSpeed engines or plain modules),
adapter, method and data stream. The only place that joins a model family to a method."""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from megadistill import distributed as grid_lib
from megadistill.config import ConfigError, RunConfig
from megadistill.methods.registry import build_method
from megadistill.methods.roles import EMA, ModelBundle, RoleHandle
from megadistill.distributed.zero import zero_stage
from megadistill.distributed.deepspeed_comm import init_deepspeed_comm
from megadistill.models.registry import get_family

from .ema import PartitionedEMA


@dataclass
class Run:
    cfg: RunConfig
    bundle: ModelBundle
    adapter: Any
    method: Any
    data: Any
    device: torch.device


def lr_lambda(kind: str, warmup: int, max_steps: int):
    """Multiplier of the base lr at optimizer step ``s``: linear warm-up, then constant, cosine to
    zero, or linear to zero over the remaining steps."""
    def f(s):
        if warmup and s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = min(1.0, (s - warmup) / max(1, max_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac
    return f


def role_ds_config(ds_config: dict, cfg: RunConfig, role: str, trainable: bool) -> dict:
    """The DeepSpeed config of one role: the user's file with batch sizes, clipping and precision
    filled in from the run config (the run config is the single source of truth for them)."""
    d = copy.deepcopy(ds_config)
    t = cfg.training
    world_dp = grid_lib.get_dp_size() * grid_lib.get_sp_size()
    d["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    d["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    d["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation_steps * world_dp
    d.setdefault("steps_per_print", 10**9)
    d.setdefault("zero_allow_untested_optimizer", True)
    d.setdefault("zero_force_ds_cpu_optimizer", False)
    if trainable:
        d["gradient_clipping"] = cfg.training.optim_for(role).grad_clip
    return d


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_handle(name: str, module, cfg: RunConfig, ds_config: dict | None) -> RoleHandle:
    mc = cfg.models[name]
    if not mc.trainable:
        module.eval().requires_grad_(False)
        if zero_stage(ds_config) == 3 and mc.zero3_partition:
            # The frozen teacher is partitioned like the trained roles; DeepSpeed gathers each
            # layer for its forward and frees it after (no optimizer, no gradients).
            import deepspeed

            engine, _, _, _ = deepspeed.initialize(model=module, config=role_ds_config(ds_config, cfg, name, False),
                                                   mpu=grid_lib.mpu)
            return RoleHandle(name=name, module=None, trainable=False, engine=engine)
        return RoleHandle(name=name, module=module, trainable=False)
    o = cfg.training.optim_for(name)
    optimizer = torch.optim.AdamW(module.parameters(), lr=o.lr, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.training.lr_scheduler, cfg.training.warmup_steps, cfg.training.max_steps))
    ema = None
    if name == "student" and cfg.training.ema is not None:
        ema_cls = PartitionedEMA if zero_stage(ds_config) == 3 else EMA
        ema = ema_cls(module, cfg.training.ema.decay, cfg.training.ema.start_step)
    if ds_config is None:
        return RoleHandle(name=name, module=module, trainable=True, optimizer=optimizer,
                          lr_scheduler=schedule, ema=ema, grad_clip=o.grad_clip or None)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                           config=role_ds_config(ds_config, cfg, name, True),
                                           mpu=grid_lib.mpu)
    return RoleHandle(name=name, module=None, trainable=True, engine=engine, ema=ema)


def build_data(cfg: RunConfig, family):
    t = cfg.training
    rank = grid_lib.get_dp_rank() if grid_lib.is_initialized() else 0
    world = grid_lib.get_dp_size() if grid_lib.is_initialized() else 1
    kind = cfg.data.kind
    if kind == "prompts":
        from megadistill.data.prompts import PromptStream, read_prompts

        return PromptStream(read_prompts(cfg.data.path), t.micro_batch_size, seed=t.seed, rank=rank,
                            world_size=world)
    if kind == "synthetic":
        return family.build_synthetic_stream(cfg, rank=rank, world_size=world)
    if kind == "webdataset":
        from megadistill.data.latents import LatentShardStream

        return LatentShardStream(cfg.data.path, t.micro_batch_size, seed=t.seed, rank=rank,
                                 world_size=world, shuffle_buffer=cfg.data.shuffle_buffer)
    raise ConfigError("config", "data.kind", f"unknown data kind {kind!r}")


def check_parallel_layout(cfg: RunConfig, ds_config: dict | None):
    """The layouts the trainer runs: any dp (ZeRO or not) x tp x Ulysses sp, with a DeepSpeed
    config when tp or sp > 1 (its engines reduce gradients over dp x sp and take the tp-aware grad
    norm; plain torch handles do neither). Pipeline parallel (pp > 1) has its own rules
    (:func:`megadistill.train.pipeline_run.check_pipeline_layout`)."""
    p = cfg.parallel
    if p.pp > 1:
        from .pipeline_run import check_pipeline_layout

        check_pipeline_layout(cfg, ds_config)
        return
    if (p.tp > 1 or p.sp > 1) and ds_config is None:
        raise ConfigError("config", "parallel", f"tp={p.tp} sp={p.sp} needs DeepSpeed engines: pass --ds_config "
                          "(e.g. configs/ds/zero3_cpu.json), or set parallel.tp and parallel.sp to 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if ds_config is None and world > p.tp * p.sp:
        # Plain torch roles reduce no gradients: data-parallel replicas would silently diverge.
        raise ConfigError("launcher", "--ds_config", f"{world} ranks with tp*sp = {p.tp * p.sp} is data parallel, "
                          "which needs DeepSpeed engines to reduce gradients: pass --ds_config (e.g. "
                          "configs/ds/zero3_cpu.json) or launch tp*sp ranks")


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_output_gradient(module: torch.nn.Module, factor: float):
    """Make ``module``'s output pass gradients back multiplied by ``factor`` (forward unchanged).

    Why, with Ulysses sp: every sp rank computes the same full loss from the full output, but the
    output's all-gather sends back to each rank only its own tokens' gradient, so rank r's parameter
    gradient g_r is its tokens' share and the true gradient is sum_r g_r. The DeepSpeed engines
    AVERAGE over dp x sp; scaling by ``factor = sp`` makes that average
    (1/dp) sum_d sum_r g_{d,r}, the single-process gradient of the dp-mean loss."""
    def hook(_module, _inputs, output):
        return _ScaleGradient.apply(output, float(factor))
    return module.register_forward_hook(hook)


def build_run(cfg: RunConfig, ds_config: dict | None = None) -> Run:
    p = cfg.parallel
    check_parallel_layout(cfg, ds_config)
    if p.pp > 1:  # each rank builds its stage's slices; the method runs on the pipeline executor
        from .pipeline_run import build_pipeline_run

        return build_pipeline_run(cfg, ds_config)
    grid_lib.initialize(tp=p.tp, sp=p.sp, pp=p.pp)
    if ds_config is not None:
        import torch.distributed as dist

        # DeepSpeed keeps its own handle on the (already created) default group; zero.Init needs it.
        if dist.is_initialized():
            init_deepspeed_comm()
    family = get_family(cfg.recipe.family)
    device = _device()
    handles = {}
    for index, name in enumerate(("student", "teacher", "critic")):
        if name not in cfg.models:
            continue
        partition = zero_stage(ds_config) == 3 and cfg.models[name].zero3_partition
        zero3 = role_ds_config(ds_config, cfg, name, cfg.models[name].trainable) if partition else None
        module = family.build_model(cfg.models[name], cfg, seed=cfg.training.seed + 1000 * index,
                                    zero3_config=zero3, mpu=grid_lib.mpu if zero3 else None)
        if cfg.models[name].trainable and p.sp > 1:
            scale_output_gradient(module, p.sp)
        handles[name] = build_handle(name, module.to(device), cfg, ds_config)
    bundle = ModelBundle(handles)
    adapter = family.build_adapter(cfg, device, {n: h.module for n, h in handles.items()})
    # The same seed on every rank: methods derive per-step draws (e.g. the exit step) from it.
    method = build_method(cfg.recipe.method, bundle, adapter, cfg.method_config, seed=cfg.training.seed)
    return Run(cfg=cfg, bundle=bundle, adapter=adapter, method=method,
               data=build_data(cfg, family), device=device)
