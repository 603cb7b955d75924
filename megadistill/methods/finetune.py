"""Finetune: flow-matching training of the student on data latents.

Per sample: a grid index ``k ~ U{0, ..., T-1}`` and the timestep ``t = T * sigma_k`` on the
shifted training grid ``sigma_k = shift_sigma(1 - k/T, timestep_shift)`` (so ``sigma`` in
``(0, 1]``, never 0); noise ``eps``; ``x_t = (1 - sigma) x0 + sigma eps``; loss
``mean((v(x_t, t) - (eps - x0))^2)``.

CFG dropout (``cfg_dropout_prob`` = p): each sample's conditioning is replaced by the negative
(empty-prompt) conditioning with probability p, so that the model also learns the unconditional
prediction that classifier-free guidance needs at sampling time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch

from megadistill.diffusion import FlowMatchScheduler
from megadistill.pipeline.graph import OpGraph, single_role_graph

from .adapter import Adapter, PreparedBatch
from .base import SamplingSpec, TrainingMethod, flow_matching_loss, parse_method_config, require_number
from .registry import register_method
from .roles import ModelBundle

METHOD = "finetune"


@dataclass(frozen=True)
class FinetuneConfig:
    """``method_config`` of finetune. ``timestep_shift`` defaults to the adapter scheduler's shift."""

    cfg_dropout_prob: float = 0.0
    timestep_shift: Optional[float] = None

    def __post_init__(self):
        require_number(METHOD, "cfg_dropout_prob", self.cfg_dropout_prob, 0.0, 1.0)
        if self.timestep_shift is not None:
            require_number(METHOD, "timestep_shift", self.timestep_shift, positive=True)


@register_method(METHOD)
class FinetuneMethod(TrainingMethod):
    """Flow-matching finetune of the ``student`` role on ``batch`` data latents."""

    roles = {"student": True}

    def __init__(self, bundle: ModelBundle, adapter: Adapter, method_config: Optional[Mapping[str, Any]] = None,
                 seed: int = 0):
        super().__init__(bundle, adapter, method_config)
        self.config = parse_method_config(FinetuneConfig, method_config, METHOD)
        sched = adapter.noise_scheduler
        shift = sched.shift if self.config.timestep_shift is None else float(self.config.timestep_shift)
        self.timestep_grid = FlowMatchScheduler(sched.num_train_timesteps, shift).timesteps
        self.seed = int(seed)  # nothing here needs rank-agreeing randomness; kept for a uniform constructor

    def sample_timesteps(self, batch_size: int, device) -> torch.Tensor:
        """``[B]`` float64 timesteps drawn uniformly from the shifted training grid."""
        k = torch.randint(0, self.timestep_grid.numel(), (batch_size,), device=device)
        return self.timestep_grid.to(device)[k]

    def conditioning(self, batch: PreparedBatch) -> Any:
        """The batch's conditioning after CFG dropout."""
        p = self.config.cfg_dropout_prob
        if p == 0.0:
            return batch.cond
        drop = torch.rand(batch.batch_size, device=batch.latents.device) < p
        return self.adapter.where_cond(drop, self.adapter.negative_cond(batch), batch.cond)

    def loss(self, batch: PreparedBatch, t: torch.Tensor, eps: torch.Tensor, cond: Any) -> torch.Tensor:
        """Flow-matching loss of the student at given timesteps, noise and conditioning."""
        x_t = self.adapter.add_noise(batch.latents, eps, t)
        v = self.adapter.predict_flow(self.bundle["student"], x_t, t, cond)
        return flow_matching_loss(v, batch.latents, eps)

    def train_step(self, batch: Mapping[str, Any], step: int) -> Dict[str, float]:
        prepared = self.adapter.prepare_batch(batch, latents_source="data")
        x0 = prepared.latents
        loss = self.loss(prepared, self.sample_timesteps(x0.shape[0], x0.device), torch.randn_like(x0),
                         self.conditioning(prepared))
        return self.update("student", loss, step)

    def sampling_spec(self, num_steps: Optional[int] = None) -> SamplingSpec:
        """Euler on the flow over ``num_steps`` (default 50) uniform steps of the shifted schedule."""
        from megadistill.diffusion import sample_timesteps_uniform

        sched = self.adapter.noise_scheduler
        steps = sample_timesteps_uniform(num_steps or 50, shift=sched.shift,
                                         num_train_timesteps=sched.num_train_timesteps)
        return SamplingSpec(role="student", timesteps=tuple(float(t) for t in steps), sampler="ode")

    def step_graph(self, step: int, num_microbatches: int) -> List[OpGraph]:
        """One phase: per microbatch ``student.denoise`` (forward) and ``student.backward``."""
        return [single_role_graph(num_microbatches, "finetune step")]
