"""Model-agnostic samplers over a velocity predictor ``predict_flow(x, t) -> v``.

``predict_flow`` receives the current latent (in the dtype of ``noise``) and the timestep as a
float64 tensor of shape ``[B]`` (``t = T * sigma``, shifted scale); it returns ``v = eps - x0``.
Both samplers start from ``noise`` taken as the sample at the first timestep and use the given
list as the model's evaluation points; the final noise level 0 is implicit.

* ODE (Euler on the flow): ``x <- x + (sigma_next - sigma) v``, ending at sigma 0.
* SDE (DMD few-step sampling): ``x0 = x - sigma v``; then re-noise ``x0`` with fresh Gaussian
  noise to the next timestep, ``x <- (1 - sigma_next) x0 + sigma_next eps'``; the last step's
  ``x0`` is the sample.

The running state is kept in at least float32 and the result is returned in ``noise.dtype``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .scheduler import FlowMatchScheduler, _compute_dtype

PredictFlow = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ode_sample(predict_flow: PredictFlow, noise: torch.Tensor, timesteps,
               scheduler: FlowMatchScheduler) -> torch.Tensor:
    """Euler integration of ``dx/dsigma = v`` from ``sigma = t_0 / T`` down to sigma 0."""
    ts = _check_timesteps(timesteps, scheduler)
    sigmas = torch.cat([scheduler.sigma_from_timestep(ts), ts.new_zeros(1)]).tolist()
    x = noise.to(_compute_dtype(noise.dtype))
    for i, t in enumerate(ts):
        v = predict_flow(x.to(noise.dtype), _batch_timestep(t, noise))
        x = x + (sigmas[i + 1] - sigmas[i]) * v.to(x.dtype)
    return x.to(noise.dtype)


def sde_sample(predict_flow: PredictFlow, noise: torch.Tensor, timesteps, scheduler: FlowMatchScheduler,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Few-step DMD sampling: predict x0 at each timestep, re-noise it to the next one.

    The fresh noise of step ``i`` is ``torch.randn(noise.shape, generator=generator)`` drawn on
    ``noise.device`` in the compute dtype, one draw per re-noising (``len(timesteps) - 1`` draws).
    """
    ts = _check_timesteps(timesteps, scheduler)
    dtype = _compute_dtype(noise.dtype)
    x = noise.to(dtype)
    x0 = x
    for i, t in enumerate(ts):
        t_b = _batch_timestep(t, noise)
        v = predict_flow(x.to(noise.dtype), t_b)
        x0 = scheduler.x0_from_flow(x, v.to(dtype), t_b)
        if i + 1 < len(ts):
            eps = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=dtype)
            x = scheduler.add_noise(x0, eps, _batch_timestep(ts[i + 1], noise))
    return x0.to(noise.dtype)


def _batch_timestep(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(device=x.device).expand(x.shape[0]).clone()


def _check_timesteps(timesteps, scheduler: FlowMatchScheduler) -> torch.Tensor:
    ts = torch.as_tensor(timesteps, dtype=torch.float64)
    T = scheduler.num_train_timesteps
    if ts.dim() != 1 or ts.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D list, got shape {tuple(ts.shape)}")
    if bool(((ts <= 0) | (ts > T)).any()):
        raise ValueError(f"sampling timesteps must lie in (0, {T}] (sigma 0 is appended), got {ts.tolist()}")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"sampling timesteps must be strictly decreasing, got {ts.tolist()}")
    return ts
