"""Rectified-flow noise schedule with Wan's timestep shift.

Two coordinates are used throughout and must not be confused:

* ``u`` -- the *unshifted* sigma, a point on the uniform training grid
  ``u_k = linspace(1, 0, T + 1)[:-1]`` (``T = num_train_timesteps``).
* ``sigma`` -- the *noise level* that actually enters the data: ``x_t = (1 - sigma) x0 + sigma eps``.
  It is the shifted grid point ``sigma = s u / (1 + (s - 1) u)`` (``s = shift``; ``s = 1`` is
  the identity).

A timestep is always ``t = T * sigma``, so ``sigma = t / T`` -- the timestep already carries the
shift, and a model is conditioned on ``t`` directly. ``unshift_sigma`` inverts the shift,
``u = sigma / (s - (s - 1) sigma)``; it is needed only to place a timestep back on the uniform
grid (e.g. to warp a few-step list, see ``timesteps.denoising_step_list``).

Flow matching: the model predicts the velocity ``v = d x_t / d sigma = eps - x0``, hence
``x0 = x_t - sigma v`` and ``v = (x_t - x0) / sigma``.

``add_noise`` / ``x0_from_flow`` use ``sigma = t / T`` exactly for any continuous ``t``. (The public
Self-Forcing code snaps ``t`` to the nearest training-grid timestep in both; the two agree on grid
timesteps such as warped step lists. :meth:`FlowMatchScheduler.snap_to_grid` reproduces the
snapping where bit-parity with that code is wanted.)

Tables are float64; per-sample math runs in at least float32 and returns the input's dtype.
"""
from __future__ import annotations

import torch


def shift_sigma(u, shift: float):
    """Map an unshifted sigma ``u`` in [0, 1] to the noise level ``s u / (1 + (s - 1) u)``."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma, shift: float):
    """Inverse of :func:`shift_sigma`: ``u = sigma / (s - (s - 1) sigma)``."""
    return sigma / (shift - (shift - 1) * sigma)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 latents are mixed in float32: sigma in bf16 alone would carry a 0.4% error.
    return torch.promote_types(dtype, torch.float32)


class FlowMatchScheduler:
    """Shifted flow-matching schedule over ``num_train_timesteps`` training steps.

    Attributes:
        sigmas: float64 ``[T]`` noise levels of the training grid, from 1 down to ``sigma(1/T)``.
        timesteps: float64 ``[T]``, ``T * sigmas`` (``timesteps[0] == T``).
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        u = torch.linspace(1.0, 0.0, self.num_train_timesteps + 1, dtype=torch.float64)[:-1]
        self.sigmas = shift_sigma(u, self.shift)
        self.timesteps = self.sigmas * self.num_train_timesteps

    def __repr__(self) -> str:
        return f"FlowMatchScheduler(num_train_timesteps={self.num_train_timesteps}, shift={self.shift})"

    # -- coordinates -------------------------------------------------------------------------
    def shift_sigma(self, u):
        """Unshifted grid coordinate ``u`` -> noise level ``sigma`` (this scheduler's shift)."""
        return shift_sigma(u, self.shift)

    def unshift_sigma(self, sigma):
        """Noise level ``sigma`` -> unshifted grid coordinate ``u`` (inverse of the shift)."""
        return unshift_sigma(sigma, self.shift)

    def sigma_from_timestep(self, t) -> torch.Tensor:
        """Noise level of timestep ``t`` (continuous, in [0, T]): ``sigma = t / T``.

        This is the already-shifted sigma; apply :meth:`unshift_sigma` to get the grid
        coordinate ``u``. Integer timesteps are promoted to float64.
        """
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        return t / self.num_train_timesteps

    def timestep_from_sigma(self, sigma) -> torch.Tensor:
        """``t = T * sigma`` for a noise level ``sigma`` (already shifted)."""
        sigma = torch.as_tensor(sigma)
        if not sigma.is_floating_point():
            sigma = sigma.to(torch.float64)
        return sigma * self.num_train_timesteps

    def snap_to_grid(self, t) -> torch.Tensor:
        """Nearest training-grid timestep to each ``t`` (float64, same shape as ``t``)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        grid = self.timesteps.to(t.device)
        idx = (grid.view(-1, *([1] * t.dim())) - t.unsqueeze(0)).abs().argmin(dim=0)
        return grid[idx]

    # -- the interpolation x_t = (1 - sigma) x0 + sigma eps ----------------------------------
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t, frame_dim: int = 2) -> torch.Tensor:
        """``x_t = (1 - sigma) x0 + sigma eps`` with ``sigma = t / T`` per sample.

        ``t`` is a scalar, ``[B]`` (one timestep per sample) or ``[B, F]`` (one per frame, causal
        students); it is broadcast over a ``[B, C, F, H, W]`` latent (``frame_dim`` names the
        frame axis for other layouts).
        """
        sigma, dtype = self._sigma_like(t, x0, frame_dim)
        x_t = (1 - sigma) * x0.to(dtype) + sigma * eps.to(dtype)
        return x_t.to(x0.dtype)

    @staticmethod
    def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Velocity target ``v = eps - x0`` (``d x_t / d sigma``)."""
        return eps - x0

    def x0_from_flow(self, x_t: torch.Tensor, v: torch.Tensor, t, frame_dim: int = 2) -> torch.Tensor:
        """Clean-sample estimate ``x0 = x_t - sigma v``."""
        sigma, dtype = self._sigma_like(t, x_t, frame_dim)
        return (x_t.to(dtype) - sigma * v.to(dtype)).to(x_t.dtype)

    def flow_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t, frame_dim: int = 2) -> torch.Tensor:
        """Velocity ``v = (x_t - x0) / sigma``; undefined at sigma 0, which is rejected."""
        sigma, dtype = self._sigma_like(t, x_t, frame_dim)
        if bool((sigma <= 0).any()):
            raise ValueError("flow_from_x0: sigma must be > 0 (at t = 0, x_t == x0 and v is undefined)")
        return ((x_t.to(dtype) - x0.to(dtype)) / sigma).to(x_t.dtype)

    def _sigma_like(self, t, x: torch.Tensor, frame_dim: int):
        """sigma of ``t`` shaped to broadcast against ``x``, plus the dtype to compute in."""
        dtype = _compute_dtype(x.dtype)
        sigma = self.sigma_from_timestep(t).to(device=x.device, dtype=dtype)
        if sigma.dim() == 0:
            return sigma, dtype
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"timestep batch {tuple(sigma.shape)} does not match "
                             f"latent batch {tuple(x.shape)}")
        if sigma.dim() == 1:
            return sigma.reshape(-1, *([1] * (x.dim() - 1))), dtype
        if sigma.dim() == 2:
            frame_dim = frame_dim % x.dim()
            if frame_dim == 0 or sigma.shape[1] != x.shape[frame_dim]:
                raise ValueError(f"per-frame timesteps {tuple(sigma.shape)} do not match frame axis "
                                 f"{frame_dim} of latent {tuple(x.shape)}")
            shape = [1] * x.dim()
            shape[0], shape[frame_dim] = sigma.shape
            return sigma.reshape(shape), dtype
        raise ValueError(f"timesteps must be a scalar, [B] or [B, F]; got shape {tuple(sigma.shape)}")
