"""Training with pipeline parallelism (``parallel.pp > 1``): the builder's and trainer's pp parts.

Layout. world = pp (tp = sp = dp = 1). Pipeline rank ``s`` builds, for every role, only its stage's
slice (:class:`megadistill.models.wan.pipeline_stage.WanPipelineStage`): the DiT is built on the
meta device, the slice is given storage and filled parameter by parameter -- from the preset's
per-name deterministic init (``init_value``; the same values the single-process build gives) or
from the role's checkpoint. No rank ever holds another stage's weights.

Update. Each trainable role's slice has its own torch AdamW and lr schedule (no DeepSpeed engine;
ZeRO-3 is refused, see :func:`check_pipeline_layout`). One optimizer step is
:func:`megadistill.methods.dmd2_pipeline.dmd2_pipeline_step`: the batch is split into
``parallel.microbatches`` equal microbatches and the method's op graph runs on the
:class:`~megadistill.pipeline.executor.PipelineExecutor` under ``parallel.pipeline_schedule``.
Losses are computed on the last stage and broadcast over the pipeline group, so every rank
returns the same logs (rank 0 writes them, as in every layout).

EMA. A role's EMA is elementwise, so each stage keeps the EMA of its slice; it is updated after
every applied generator update (finite norm) with the step, as ``RoleHandle.step`` does.
Validation sampling needs the whole student on one rank and is skipped under pp > 1.

Checkpoints: :mod:`megadistill.train.checkpoint` with ``stage=``, which writes each stage's slices
as ``<role>_stage<s>.safetensors`` / ``.optim.pt`` / ``ema_<role>_stage<s>.safetensors``;
``meta.json`` records ``pipeline_stages`` and a checkpoint resumes only with the same pp.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping

import torch
import torch.distributed as dist

from megadistill import distributed as grid_lib
from megadistill.config import ConfigError, RunConfig
from megadistill.distributed.zero import zero_stage
from megadistill.methods.registry import build_method
from megadistill.methods.roles import ModelBundle
from megadistill.models.registry import get_family
from megadistill.pipeline.executor import PipelineExecutor, StageRole, check_pipeline_zero_stage


_ROLE_ORDER = ("student", "teacher", "critic")  # the builder's seed offsets: seed + 1000 * index


# --- config checks -----------------------------------------------------------------------------------

def check_pipeline_layout(cfg: RunConfig, ds_config: dict | None) -> None:
    """What ``parallel.pp > 1`` runs: DMD2 on bidirectional Wan roles, world = pp, plain torch
    optimizers per stage. Everything else is refused with what to change."""
    p = cfg.parallel
    try:
        check_pipeline_zero_stage(zero_stage(ds_config), p.pp)
    except ValueError as e:
        raise ConfigError("config", "parallel.pp", str(e)) from None
    if ds_config is not None:
        raise ConfigError("config", "parallel.pp", f"pp={p.pp}: the pipeline executor updates every stage with "
                          "plain torch AdamW (no DeepSpeed engine); run without --ds_config")
    if p.tp > 1 or p.sp > 1:
        raise ConfigError("config", "parallel", f"pp={p.pp} with tp={p.tp} sp={p.sp}: the trainer runs pipeline "
                          "layouts with tp = sp = 1 only; set parallel.tp and parallel.sp to 1")
    if cfg.recipe.method != "dmd2":
        raise ConfigError("config", "recipe.method", f"{cfg.recipe.method!r} with parallel.pp={p.pp}: only dmd2 "
                          "has a pipeline program; set parallel.pp to 1")
    if cfg.recipe.family != "wan":
        raise ConfigError("config", "recipe.family", f"{cfg.recipe.family!r} has no pipeline stage split; "
                          "set parallel.pp to 1")
    if p.activation_checkpointing:
        raise ConfigError("config", "parallel.activation_checkpointing", "is not applied inside pipeline stages; "
                          "set it to false with parallel.pp > 1")
    for name, mc in cfg.models.items():
        if mc.causal:
            raise ConfigError("config", f"models.{name}.causal", "causal roles have no pipeline stage split; "
                              "set parallel.pp to 1")
    batch = cfg.training.micro_batch_size
    if batch % num_microbatches(cfg):
        raise ConfigError("config", "parallel.microbatches", f"{num_microbatches(cfg)} does not divide "
                          f"training.micro_batch_size {batch} (microbatches must be equal)")
    if cfg.training.gradient_accumulation_steps != 1:
        raise ConfigError("config", "training.gradient_accumulation_steps", "must be 1 with parallel.pp > 1 "
                          "(raise parallel.microbatches instead)")


def num_microbatches(cfg: RunConfig) -> int:
    m = cfg.parallel.microbatches
    return cfg.training.micro_batch_size if m is None else int(m)


# --- stage slices ------------------------------------------------------------------------------------

def build_stage_module(model_cfg, run_cfg: RunConfig, seed: int, stage: int, num_stages: int, device):
    """Stage ``stage``'s slice of one role, materialized alone: built on meta, then each of its
    parameters filled from the checkpoint (``model_cfg.path``) or ``init_value(name, shape, seed)``
    (the preset's init, so the slices of all stages form the single-process model)."""
    from megadistill.models.wan import WanDiT, get_preset
    from megadistill.models.wan.checkpoint import open_wan_checkpoint
    from megadistill.models.wan.dit import init_value
    from megadistill.models.wan.family import _DTYPES
    from megadistill.models.wan.loading import build_on_meta
    from megadistill.models.wan.pipeline_stage import WanPipelineStage

    dtype = _DTYPES[model_cfg.dtype]
    text_len = run_cfg.pipeline_config.text_len

    def slice_of(config, value):
        part = WanPipelineStage(build_on_meta(WanDiT, config), stage, num_stages)
        part.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in part.named_parameters():
                p.copy_(value(name, tuple(p.shape)).to(dtype))
        return part.to(device=device, dtype=dtype)

    if not model_cfg.path:
        try:
            config = get_preset(model_cfg.preset).replace(text_len=text_len)
        except ValueError as e:
            raise ConfigError("config", "models.*.preset", str(e)) from None
        return slice_of(config, lambda name, shape: init_value(name, shape, seed))
    with open_wan_checkpoint(model_cfg.path) as ckpt:
        if ckpt.config.text_len != text_len:
            raise ConfigError("config", "pipeline_config.text_len", f"{text_len} differs from the checkpoint's "
                              f"text_len {ckpt.config.text_len} ({model_cfg.path})")
        return slice_of(ckpt.config, lambda name, shape: ckpt.load(name))


# --- the run -----------------------------------------------------------------------------------------

class PipelineDMD2:
    """``train_step(batch, step)`` of DMD2 on the pipeline executor: what the trainer calls in place
    of ``DMD2Method.train_step``. Every other attribute is the method's."""

    def __init__(self, method, executor: PipelineExecutor, num_microbatches: int, schedule: str):
        self.method, self.executor = method, executor
        self.num_microbatches, self.schedule = num_microbatches, schedule

    def train_step(self, batch: Mapping[str, Any], step: int) -> Dict[str, float]:
        from megadistill.methods.dmd2_pipeline import dmd2_pipeline_step

        logs = dmd2_pipeline_step(self.method, self.executor, batch, step, self.num_microbatches, self.schedule)
        student = self.method.bundle["student"]
        norm = logs.get("generator_grad_norm")
        if student.ema is not None and norm is not None and math.isfinite(norm):
            student.ema.update(step)
        return logs

    def __getattr__(self, name):
        if name == "method":  # not set yet (e.g. during copy): no recursion
            raise AttributeError(name)
        return getattr(self.method, name)


def build_pipeline_run(cfg: RunConfig, ds_config: dict | None = None):
    """:func:`megadistill.train.builder.build_run` for ``parallel.pp > 1`` (see the module docstring)."""
    from .builder import Run, _device, build_data, build_handle

    p = cfg.parallel
    check_pipeline_layout(cfg, ds_config)
    grid_lib.initialize(tp=p.tp, sp=p.sp, pp=p.pp)
    if grid_lib.get_dp_size() > 1:
        raise ConfigError("config", "parallel.pp", f"world size {dist.get_world_size()} with pp={p.pp} gives "
                          f"dp={grid_lib.get_dp_size()}: the pipeline executor does not reduce gradients over "
                          f"data-parallel replicas yet; launch exactly {p.pp} processes")
    stage, num_stages = grid_lib.get_pp_rank(), grid_lib.get_pp_size()
    family = get_family(cfg.recipe.family)
    device = _device()
    handles, stage_roles = {}, {}
    for index, name in enumerate(_ROLE_ORDER):
        if name not in cfg.models:
            continue
        module = build_stage_module(cfg.models[name], cfg, cfg.training.seed + 1000 * index, stage, num_stages,
                                    device)
        h = build_handle(name, module, cfg, None)
        handles[name] = h
        stage_roles[name] = StageRole(name, h.module, h.optimizer, h.lr_scheduler, h.grad_clip,
                                      replicated=module.replicated_parameters())
    bundle = ModelBundle(handles)
    adapter = family.build_adapter(cfg, device, {n: h.module for n, h in handles.items()})
    method = build_method(cfg.recipe.method, bundle, adapter, cfg.method_config, seed=cfg.training.seed)
    executor = PipelineExecutor(stage_roles, stage, num_stages, grid_lib.get_pp_group(),
                                grid_lib.get_model_parallel_group(), grid_lib.get_tp_rank(), device)
    program = PipelineDMD2(method, executor, num_microbatches(cfg), p.pipeline_schedule)
    return Run(cfg=cfg, bundle=bundle, adapter=adapter, method=program, data=build_data(cfg, family),
               device=device)


