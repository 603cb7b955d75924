"""Model-agnostic sampling for validation and ``launch/sample.py``.

A model is reached only through callables ``predict_flow(x_t, t) -> v`` (the conventions of
:mod:`megadistill.diffusion.samplers`: ``t`` float64 ``[B]`` on the shifted scale, ``v = eps - x0``),
so the same code samples any family, any role, with or without classifier-free guidance:

    v = guided_prediction(cond(x, t), uncond(x, t), scale, convention)

``convention`` "cfg": ``uncond + s (cond - uncond)``; "dmd": ``cond + g (cond - uncond)`` (see
:mod:`megadistill.diffusion.guidance`). A scale that reduces to the conditional prediction alone
(cfg 1, dmd 0) skips the unconditional call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megadistill.diffusion import (CONVENTIONS, FlowMatchScheduler, denoising_step_list, guided_prediction, ode_sample,
                                   sample_timesteps_uniform, sde_sample)

PredictFlow = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ode", "sde")


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: the unconditional predictor, the scale and its convention."""

    predict_flow_uncond: PredictFlow
    scale: float
    convention: str = "cfg"

    def __post_init__(self):
        if self.convention not in CONVENTIONS:
            raise ValueError(f"guidance convention {self.convention!r}: choose one of {CONVENTIONS} "
                             "('cfg': uncond + s*(cond - uncond); 'dmd': cond + g*(cond - uncond))")

    @property
    def is_identity(self) -> bool:
        """True when the guided prediction equals the conditional one."""
        return self.scale == (1.0 if self.convention == "cfg" else 0.0)


def guided(predict_flow: PredictFlow, guidance: Optional[Guidance]) -> PredictFlow:
    """``predict_flow`` with ``guidance`` applied (itself when there is none)."""
    if guidance is None or guidance.is_identity:
        return predict_flow

    def predict(x, t):
        cond = predict_flow(x, t)
        uncond = guidance.predict_flow_uncond(x, t)
        return guided_prediction(cond, uncond, guidance.scale, guidance.convention)
    return predict


@torch.no_grad()
def sample_video(predict_flow: PredictFlow, noise: torch.Tensor, timesteps, scheduler: FlowMatchScheduler,
                 sampler: str = "ode", generator: Optional[torch.Generator] = None,
                 guidance: Optional[Guidance] = None) -> torch.Tensor:
    """Clean latents from ``noise`` (the sample at ``timesteps[0]``), through ``timesteps``.

    ``sampler="ode"``: Euler on the flow; ``"sde"``: DMD few-step sampling (predict x0, re-noise to
    the next timestep with noise from ``generator``). ``guidance``: optional CFG, see the module doc.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: choose one of {SAMPLERS}")
    predict = guided(predict_flow, guidance)
    if sampler == "ode":
        return ode_sample(predict, noise, timesteps, scheduler)
    return sde_sample(predict, noise, timesteps, scheduler, generator=generator)


def sampling_timesteps(scheduler: FlowMatchScheduler, steps: Optional[Sequence[int]] = None,
                       num_steps: Optional[int] = None, warp: bool = False) -> torch.Tensor:
    """The timestep list of either an explicit few-step list (``steps``, e.g. ``[1000, 750, 500, 250]``,
    optionally warped onto the shifted grid) or ``num_steps`` uniform steps of the shifted schedule."""
    if (steps is None) == (num_steps is None):
        raise ValueError("give exactly one of steps (a few-step list) or num_steps (uniform steps)")
    T = scheduler.num_train_timesteps
    if steps is not None:
        return denoising_step_list(list(steps), warp=warp, shift=scheduler.shift, num_train_timesteps=T)
    return sample_timesteps_uniform(num_steps, shift=scheduler.shift, num_train_timesteps=T)


def noise_for(index: int, shape: Sequence[int], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Starting noise of sample ``index``: a function of ``(seed, index)`` only, so a sample does not
    depend on the batch it was generated in."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(dtype)
