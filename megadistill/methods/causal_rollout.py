"""Block-autoregressive rollout of a block-causal network through the :class:`CausalAdapter`.

Shared by self-forcing training (graded rollouts) and causal sampling (validation,
``launch/sample.py --causal``). With step list ``t_0 > ... > t_{m-1}``, noise ``eps`` of F frames
cut into blocks of n frames and a per-block exit index ``e_b``:

    cache = new_cache(B, F)
    for block b (start frame s = b*n):
        x = eps[:, :, s:s+n]                                   # the block's sample at t_0
        for j < e_b (no grad):  x0 = x0_block(x, t_j);  x = (1 - sigma_{j+1}) x0 + sigma_{j+1} eps'
        x0_b = x0_block(x, t_{e_b})                             # with grad iff b >= grad_from_block
        refresh (no grad, all but the last block):
            x_c = x0_b                      if t_c = 0
            x_c = (1 - t_c/T) x0_b + (t_c/T) eps''  else      (context noise)
            x0_block(x_c, t_c)  -- only its cache write is kept
    video = concat_b x0_b

Every call of a block writes the same cache slots, so the refresh is what later blocks attend to.
``eps'`` and ``eps''`` are fresh noise from ``generator`` (the device's default generator if None).
Sampling is the rollout with every ``e_b = m - 1`` and no grad.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .adapter import CausalAdapter
from .roles import RoleHandle


def batch_timestep(t, like: torch.Tensor) -> torch.Tensor:
    """Timestep ``t`` (a number or 0-d tensor) as a float64 ``[B]`` tensor on ``like``'s device."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return t.to(like.device).expand(like.shape[0]).clone()


def fresh_noise(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def refresh_block(adapter: CausalAdapter, handle: RoleHandle, x0: torch.Tensor, cond: Any, cache: Any,
                  start_frame: int, context_timestep: float = 0.0,
                  generator: Optional[torch.Generator] = None) -> None:
    """Re-run block ``x0`` (the clean output) at ``context_timestep`` (re-noised to it when > 0)
    without grad, so that the cache holds its keys for the next blocks."""
    with torch.no_grad():
        x0 = x0.detach()
        t = batch_timestep(context_timestep, x0)
        x = x0 if context_timestep == 0 else adapter.add_noise(x0, fresh_noise(x0, generator), t)
        adapter.predict_flow_block(handle, x, t, cond, cache, start_frame)


def block_rollout(adapter: CausalAdapter, handle: RoleHandle, cond: Any, noise: torch.Tensor,
                  timesteps: torch.Tensor, exits: Sequence[int], *, grad_from_block: Optional[int] = None,
                  context_timestep: float = 0.0, generator: Optional[torch.Generator] = None,
                  on_block: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """The rollout of the module docstring; returns the video ``[B, C, F, H, W]``.

    ``exits[b]``: index into ``timesteps`` of block b's last (output) step. ``grad_from_block``:
    blocks ``b >= grad_from_block`` run their exit step with autograd (None: no block does).
    ``on_block(b, x0_b)`` is called after each block's output (e.g. to stream or time it).
    """
    n = adapter.frames_per_block(handle)
    batch, frames = noise.shape[0], noise.shape[2]
    if frames % n:
        raise ValueError(f"the rollout has {frames} frames, not a multiple of the {n} frames per block")
    num_blocks = frames // n
    if len(exits) != num_blocks:
        raise ValueError(f"{len(exits)} exit indices for {num_blocks} blocks")
    for e in exits:
        if not 0 <= int(e) < len(timesteps):
            raise ValueError(f"exit index {e} outside [0, {len(timesteps)})")
    cache = adapter.new_cache(handle, batch, frames)
    blocks = []
    for b in range(num_blocks):
        s, exit_index = b * n, int(exits[b])
        x = noise[:, :, s:s + n]
        with torch.no_grad():
            for j in range(exit_index):
                x0 = adapter.predict_x0_block(handle, x, batch_timestep(timesteps[j], x), cond, cache, s)
                x = adapter.add_noise(x0, fresh_noise(x0, generator), batch_timestep(timesteps[j + 1], x))
        graded = grad_from_block is not None and b >= grad_from_block
        with torch.set_grad_enabled(graded):
            x0 = adapter.predict_x0_block(handle, x, batch_timestep(timesteps[exit_index], x), cond, cache, s)
        blocks.append(x0)
        if on_block is not None:
            on_block(b, x0)
        if b + 1 < num_blocks:  # nothing reads the last block's cache
            refresh_block(adapter, handle, x0, cond, cache, s, context_timestep, generator)
    return torch.cat(blocks, dim=2)
