"""Self-forcing DMD: DMD2 with a block-causal student rolled out block by block on its own outputs
(Huang et al. 2025, "Self Forcing"), teacher and critic bidirectional. Data-free (prompts only),
unless DMD2's GAN term is on (``gan_critic_weight`` > 0): its classifier then sees the batch's real
latents against the rollout's DMD window, exactly as in :mod:`.dmd2`.

Roles: ``student`` (block-causal, trained), ``teacher`` (frozen, guided), ``critic`` (trained).
Everything but the rollout is DMD2's (``dmd2.py``): the DMD timestep, the KL gradient
``(fake_x0 - real_x0) / mean|x - real_x0|``, the float64 loss ``0.5 * mean((x - sg(x - grad))^2)``,
teacher guidance with an explicit convention, the critic's flow-matching loss on detached samples
and the two time-scale rule (generator every ``generator_update_interval``-th step).

Rollout (``causal_rollout.block_rollout``) of ``R = num_rollout_frames`` frames (default: the F
frames of ``pipeline_config.latent_shape``, the training length), in blocks of the student's n
frames: each block is denoised along ``denoising_steps`` from fresh noise, without grad until its
exit step, whose x0 (with grad) is the block's output; then the block is re-run without grad on
that output at timestep 0, or re-noised to ``context_noise`` and run at it, to write its KV cache.
Gradient flows only through exit-step forwards (the cache is detached).

Long videos: with ``R > F`` the DMD loss (and the critic) sees the last F frames only, as the
public Self-Forcing code does for its extended rollouts; blocks that end before that window run
their exit step without grad too. ``random_rollout_length: true`` draws the number of blocks
uniformly from ``[F/n, R/n]`` per step.

Rank-agreeing draws: per step and phase (generator / critic) a ``torch.Generator`` seeded with
``derive_seed("self_forcing", seed, step, phase)`` draws the number of blocks (if random) and the
exit index, uniform in ``[0, len(denoising_steps))``: one for all blocks, or one per block with
``exit_step_per_block: true``. Every rank given the same run seed derives the same plan without
communication.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from megadistill.config import ConfigError
from megadistill.pipeline.graph import (BACKWARD, FORWARD, FORWARD_NOGRAD, Op, OpGraph, self_forcing_critic_graph,
                                        self_forcing_generator_graph)

from .adapter import CausalAdapter, PreparedBatch
from .base import (SamplingSpec, config_error, derive_seed, parse_method_config, require_bool, require_int,
                   require_number)
from .causal_rollout import block_rollout
from .dmd2 import CRITIC_PHASE, GENERATOR_PHASE, DMD2Config, DMD2Method
from .registry import register_method
from .roles import ModelBundle

METHOD = "self_forcing"


@dataclass(frozen=True)
class SelfForcingConfig(DMD2Config):
    """``method_config`` of self_forcing: every key of dmd2 (same meaning and checks; ``rollout_mode``
    must stay ``simulate``) plus

    ``exit_step_per_block`` (false): draw the exit step per block instead of once per step.
    ``context_noise`` (0): timestep (1000-step scale) of the cache refresh; 0 refreshes with the
        clean output.
    ``num_rollout_frames`` (null = the training length F): latent frames of the rollout; a multiple
        of the student's block size and >= F. The public code calls this ``num_training_frames``.
    ``random_rollout_length`` (false): draw the number of blocks from ``[F/n, R/n]`` per step.
    """

    exit_step_per_block: bool = False
    context_noise: float = 0.0
    num_rollout_frames: Optional[int] = None
    random_rollout_length: bool = False

    def __post_init__(self):
        try:
            super().__post_init__()
        except ConfigError as e:  # dmd2's checks, reported under this method's name
            raise config_error(METHOD, (e.key or "").removeprefix("method_config."), e.problem) from None
        if self.rollout_mode != "simulate":
            raise config_error(METHOD, "rollout_mode", f"self-forcing rolls out from noise; expected "
                               f"'simulate', got {self.rollout_mode!r}")
        require_bool(METHOD, "exit_step_per_block", self.exit_step_per_block)
        require_number(METHOD, "context_noise", self.context_noise, 0, 1000)
        if self.num_rollout_frames is not None:
            require_int(METHOD, "num_rollout_frames", self.num_rollout_frames, minimum=1)
        require_bool(METHOD, "random_rollout_length", self.random_rollout_length)


@dataclass(frozen=True)
class RolloutPlan:
    """One step's rollout: ``num_blocks`` blocks, ``exits[b]`` the exit index of block b, and
    ``grad_from_block``: the first block inside the DMD window (earlier blocks get no grad)."""

    num_blocks: int
    exits: Tuple[int, ...]
    grad_from_block: int


@register_method(METHOD)
class SelfForcingMethod(DMD2Method):
    """Self-forcing DMD over roles student (block-causal, trainable), teacher (frozen), critic
    (trainable). ``adapter`` must implement :class:`CausalAdapter`. ``seed`` seeds the rollout
    plans (see the module docstring) and must be equal on every rank."""

    roles = {"student": True, "teacher": False, "critic": True}

    def __init__(self, bundle: ModelBundle, adapter: CausalAdapter,
                 method_config: Optional[Mapping[str, Any]] = None, seed: int = 0):
        config = parse_method_config(SelfForcingConfig, method_config, METHOD)
        dmd_keys = {f.name for f in dataclasses.fields(DMD2Config)}
        try:
            super().__init__(bundle, adapter, {k: v for k, v in (method_config or {}).items() if k in dmd_keys},
                             seed=seed)
        except ConfigError as e:
            raise config_error(METHOD, (e.key or "").removeprefix("method_config."), e.problem) from None
        self.config = config
        for op in ("frames_per_block", "new_cache", "predict_flow_block", "predict_x0_block"):
            if not callable(getattr(adapter, op, None)):
                raise TypeError(f"self_forcing needs a CausalAdapter; {type(adapter).__name__} has no {op}()")
        T = adapter.noise_scheduler.num_train_timesteps
        self.context_timestep = config.context_noise * T / 1000.0
        self.block_frames = adapter.frames_per_block(bundle["student"])
        # The training length F: the frames of the run's latent shape (a prompts-only batch has exactly
        # that shape), needed before any batch to plan rollouts and op graphs.
        self.training_frames = int(adapter.latent_shape({"prompts": [""]})[2])
        self.rollout_frames = config.num_rollout_frames or self.training_frames
        n, F, R = self.block_frames, self.training_frames, self.rollout_frames
        if F % n:
            raise config_error(METHOD, "num_rollout_frames", f"the training length of {F} latent frames "
                               f"(pipeline_config.latent_shape) is not a multiple of the {n} frames per block")
        if R % n or R < F:
            raise config_error(METHOD, "num_rollout_frames", f"{R} must be a multiple of the {n} frames per "
                               f"block and at least the training length {F}")
        if config.random_rollout_length and R == F:
            raise config_error(METHOD, "random_rollout_length", f"needs num_rollout_frames > the training "
                               f"length {F}: there is only one rollout length")

    # -- schedule ---------------------------------------------------------------------------------
    @property
    def latents_source(self) -> str:
        # The rollout starts from noise; real latents only feed the GAN term's classifier.
        return "data" if self.config.uses_gan else "zeros"

    def rollout_plan(self, step: int, phase: str = GENERATOR_PHASE) -> RolloutPlan:
        """The rollout of ``step``'s generator or critic phase; a function of (seed, step, phase)."""
        if phase not in (GENERATOR_PHASE, CRITIC_PHASE):
            raise ValueError(f"phase must be {GENERATOR_PHASE!r} or {CRITIC_PHASE!r}, got {phase!r}")
        g = torch.Generator().manual_seed(derive_seed(METHOD, self.seed, int(step), phase))
        n = self.block_frames
        low, high = self.training_frames // n, self.rollout_frames // n
        num_blocks = int(torch.randint(low, high + 1, (1,), generator=g)) if self.config.random_rollout_length \
            else high
        m = len(self.denoising_steps)
        if self.config.exit_step_per_block:
            exits = tuple(int(e) for e in torch.randint(0, m, (num_blocks,), generator=g))
        else:
            exits = (int(torch.randint(0, m, (1,), generator=g)),) * num_blocks
        return RolloutPlan(num_blocks, exits, num_blocks - low)

    def exit_index(self, step: int, phase: str = GENERATOR_PHASE) -> int:
        """The exit index of the first block (all blocks unless ``exit_step_per_block``)."""
        return self.rollout_plan(step, phase).exits[0]

    # -- model calls ------------------------------------------------------------------------------
    def rollout(self, batch: PreparedBatch, plan: RolloutPlan, with_grad: bool) -> torch.Tensor:
        """The student's video for ``plan``, its last F frames (the DMD window); see the module doc."""
        if not isinstance(plan, RolloutPlan):
            raise TypeError(f"self_forcing rolls out a RolloutPlan (rollout_plan(step, phase)), got {plan!r}")
        latents = batch.latents
        if latents.shape[2] != self.training_frames:
            raise ValueError(f"batch latents have {latents.shape[2]} frames, the method was built for "
                             f"{self.training_frames} (pipeline_config.latent_shape)")
        shape = list(latents.shape)
        shape[2] = plan.num_blocks * self.block_frames
        noise = torch.randn(shape, device=latents.device, dtype=latents.dtype)
        video = block_rollout(self.adapter, self.bundle["student"], batch.cond, noise, self.denoising_steps,
                              plan.exits, grad_from_block=plan.grad_from_block if with_grad else None,
                              context_timestep=self.context_timestep)
        return video[:, :, video.shape[2] - self.training_frames:]

    def plan_logs(self, plan: RolloutPlan) -> Dict[str, float]:
        return {"generator_exit_index": sum(plan.exits) / len(plan.exits),
                "rollout_frames": float(plan.num_blocks * self.block_frames)}

    def sampling_spec(self, num_steps: Optional[int] = None) -> SamplingSpec:
        """Causal block-by-block sampling along the step list (predict x0, re-noise), the cache
        refreshed at ``context_noise``; ``num_steps`` is ignored (the student is trained for its list)."""
        return SamplingSpec(role="student", timesteps=tuple(float(t) for t in self.denoising_steps),
                            sampler="sde", causal=True, context_timestep=self.context_timestep)

    # -- op graph ---------------------------------------------------------------------------------
    def step_graph(self, step: int, num_microbatches: int) -> List[OpGraph]:
        """Phases of ``train_step(·, step)``: [generator graph] (generator steps only) + critic graph,
        from ``megadistill.pipeline.graph``'s self-forcing builders (block ``k`` attends to the cache
        of blocks ``< k``; see their docstrings). A plan with per-block exit steps, or with blocks
        before the DMD window (no grad there), is built here with the same op names."""
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        if self.config.uses_gan:
            raise NotImplementedError("self_forcing with its GAN term has no op graph (and no pipeline "
                                      "program), as dmd2's; run it with parallel.pp 1")
        block_tokens = self.block_frames * self.adapter.tokens_per_frame(self.bundle["student"])
        m = len(self.denoising_steps)
        phases: List[OpGraph] = []
        if self.is_generator_step(step):
            plan = self.rollout_plan(step, GENERATOR_PHASE)
            if _uniform(plan):
                phases.append(self_forcing_generator_graph(
                    num_microbatches, num_blocks=plan.num_blocks, num_denoise_steps=m, exit_step=plan.exits[0],
                    block_tokens=block_tokens, cfg=self.config.uses_uncond))
            else:
                phases.append(_generator_graph(num_microbatches, plan, block_tokens, self.config.uses_uncond))
        plan = self.rollout_plan(step, CRITIC_PHASE)
        if _uniform(plan):
            phases.append(self_forcing_critic_graph(num_microbatches, num_blocks=plan.num_blocks,
                                                    num_denoise_steps=m, exit_step=plan.exits[0],
                                                    block_tokens=block_tokens))
        else:
            phases.append(_critic_graph(num_microbatches, plan, block_tokens))
        return phases


def _uniform(plan: RolloutPlan) -> bool:
    """Whether the pipeline builders describe ``plan`` (one exit step, every block graded)."""
    return len(set(plan.exits)) == 1 and plan.grad_from_block == 0


def _rollout_ops(m: int, plan: RolloutPlan, block_tokens: int, with_grad: bool):
    """The rollout ops of one microbatch, per-block exits: (ops, exit ops, graded exit ops)."""
    ops, exits, graded, cache = [], [], [], None
    for k, exit_step in enumerate(plan.exits):
        kv = (k + 1) * block_tokens
        cache_dep = (cache.name,) if cache is not None else ()
        prev = None
        for j in range(exit_step + 1):
            grad = with_grad and j == exit_step and k >= plan.grad_from_block
            prev = Op("student", FORWARD if grad else FORWARD_NOGRAD, m, f"student.block{k}.step{j}",
                      deps=(prev.name,) if prev is not None else (), stage_deps=cache_dep, tokens=block_tokens,
                      kv_tokens=kv)
            ops.append(prev)
        exits.append(prev)
        if prev.kind == FORWARD:
            graded.append(prev)
        if k + 1 < len(plan.exits):
            cache = Op("student", FORWARD_NOGRAD, m, f"student.block{k}.cache", deps=(prev.name,),
                       stage_deps=cache_dep, tokens=block_tokens, kv_tokens=kv)
            ops.append(cache)
    return ops, exits, graded


def _generator_graph(num_microbatches: int, plan: RolloutPlan, block_tokens: int, cfg: bool) -> OpGraph:
    window = (plan.num_blocks - plan.grad_from_block) * block_tokens
    ops: List[Op] = []
    for m in range(num_microbatches):
        rollout, exits, graded = _rollout_ops(m, plan, block_tokens, with_grad=True)
        sample = tuple(e.name for e in exits[plan.grad_from_block:])
        scores = [Op("teacher", FORWARD_NOGRAD, m, "teacher.cond", deps=sample, tokens=window)]
        if cfg:
            scores.append(Op("teacher", FORWARD_NOGRAD, m, "teacher.uncond", deps=sample, tokens=window))
        scores.append(Op("critic", FORWARD_NOGRAD, m, "critic.fake", deps=sample, tokens=window))
        names = tuple(s.name for s in scores)
        ops += rollout + scores + [
            Op("student", BACKWARD, m, f"student.{e.step.split('.')[1]}.backward", deps=(e.name,) + names,
               forward_of=e.name, tokens=e.tokens, kv_tokens=e.kv_tokens) for e in graded]
    return OpGraph(tuple(ops), title="self-forcing generator step")


def _critic_graph(num_microbatches: int, plan: RolloutPlan, block_tokens: int) -> OpGraph:
    window = (plan.num_blocks - plan.grad_from_block) * block_tokens
    ops: List[Op] = []
    for m in range(num_microbatches):
        rollout, exits, _ = _rollout_ops(m, plan, block_tokens, with_grad=False)
        denoise = Op("critic", FORWARD, m, "critic.denoise", deps=tuple(e.name for e in exits[plan.grad_from_block:]),
                     tokens=window)
        ops += rollout + [denoise, Op("critic", BACKWARD, m, "critic.backward", deps=(denoise.name,),
                                      forward_of=denoise.name, tokens=window)]
    return OpGraph(tuple(ops), title="self-forcing critic step")
