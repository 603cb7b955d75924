"""Timestep lists and timestep sampling for few-step students and DMD training.

All timesteps are continuous values ``t = T * sigma`` on the *shifted* scale (see
``scheduler.py``); lists are float64 tensors, strictly decreasing.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .scheduler import FlowMatchScheduler, shift_sigma


def denoising_step_list(steps: Sequence[int], warp: bool = False, shift: float = 1.0,
                        num_train_timesteps: int = 1000) -> torch.Tensor:
    """Few-step list such as ``[1000, 750, 500, 250]`` as float64 timesteps.

    ``warp=False`` returns the steps unchanged: they are used as timesteps (noise level
    ``t / T``) as written.

    ``warp=True`` reads each step ``k`` as a position on the uniform training grid and returns
    the shifted timestep at that position: with ``table = [scheduler.timesteps..., 0]`` (length
    ``T + 1``), step ``k`` maps to ``table[T - k]``. Because the grid point ``T - k`` has unshifted
    sigma ``k / T``, this equals ``T * shift_sigma(k / T)``; e.g. shift 5 maps
    ``[1000, 750, 500, 250]`` to ``[1000, 937.5, 833.33.., 625]``. This is the rule of the public
    Self-Forcing / CausVid code (``warp_denoising_step``). Steps must be integers in [0, T].
    """
    T = int(num_train_timesteps)
    raw = torch.as_tensor(list(steps), dtype=torch.float64)
    if raw.dim() != 1 or raw.numel() == 0:
        raise ValueError(f"denoising steps must be a non-empty list of numbers, got {steps!r}")
    if not warp:
        _check_decreasing(raw, T, "denoising steps")
        return raw
    if not torch.equal(raw, raw.round()) or bool(((raw < 0) | (raw > T)).any()):
        raise ValueError(f"warped denoising steps must be integers in [0, {T}], got {list(steps)}")
    table = torch.cat([FlowMatchScheduler(T, shift).timesteps, torch.zeros(1, dtype=torch.float64)])
    warped = table[T - raw.long()]
    _check_decreasing(warped, T, "denoising steps")
    return warped


def sample_timesteps_uniform(n_steps: int, shift: float = 1.0,
                             num_train_timesteps: int = 1000) -> torch.Tensor:
    """Standard ``n``-step sampling list: ``T * shift_sigma(linspace(1, 0, n + 1)[:-1])``.

    The final sigma 0 is not included (samplers append it). Matches Wan's sampling sigmas;
    for ``n == T`` it is the training grid, and for ``n = 4`` it equals the warped
    ``[1000, 750, 500, 250]`` list.
    """
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    u = torch.linspace(1.0, 0.0, int(n_steps) + 1, dtype=torch.float64)[:-1]
    return shift_sigma(u, float(shift)) * num_train_timesteps


def sample_dmd_timesteps(batch: int, generator: Optional[torch.Generator], shift: float = 1.0,
                         min_t: float = 20, max_t: float = 980, low: int = 0,
                         high: int = 1000, num_train_timesteps: int = 1000,
                         device=None) -> torch.Tensor:
    """One DMD timestep per sample, float64 ``[batch]``.

    Order of operations (public Self-Forcing ``compute_distribution_matching_loss``):

    1. draw an integer ``k`` uniformly from ``[low, high)`` (default ``[0, 1000)``);
    2. shift it as a continuous value: ``t = T * shift_sigma(k / T)`` (no grid lookup);
    3. clamp to ``[min_t, max_t]`` (default ``[20, 980]`` = ``0.02 T``, ``0.98 T``).

    The clamp comes after the shift, so with shift 5 every ``k >= 907`` ends at 980.
    (Self-Forcing skips the shift unless ``shift > 1``; here any shift is applied, which is the
    same for ``shift >= 1``.) Causal students use the same ``t`` for every frame: expand the
    result to ``[batch, F]``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(f"need 0 <= low < high <= {num_train_timesteps}, got low={low}, high={high}")
    if min_t > max_t:
        raise ValueError(f"min_t={min_t} is larger than max_t={max_t}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    k = torch.randint(low, high, (batch,), generator=generator, device=device)
    t = shift_sigma(k.to(torch.float64) / num_train_timesteps, float(shift)) * num_train_timesteps
    return t.clamp(min_t, max_t)


def _check_decreasing(t: torch.Tensor, T: int, what: str) -> None:
    if bool(((t < 0) | (t > T)).any()):
        raise ValueError(f"{what} must lie in [0, {T}], got {t.tolist()}")
    if t.numel() > 1 and not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"{what} must be strictly decreasing, got {t.tolist()}")
