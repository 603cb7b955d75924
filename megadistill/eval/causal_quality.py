"""Sample quality of a block-causal (block-autoregressive) student on the synthetic world.

The student is sampled as it streams: block by block with its KV cache
(``megadistill.methods.causal_rollout.block_rollout`` with every block running the whole step list),
at the training length F and past it. Sample ``i`` starts from ``start_noise(i, [C, L, H, W], seed)``
of ``megadistill.eval.quality`` (L the generated length), with the captions and the independent
real reference set of ``quality.eval_set`` for a world of length L, so the 1x row is scored exactly
like the bidirectional benchmark's rows (same captions, same reference set, same set size) and the
2x row against ``SyntheticVideoWorld(frames=2F)`` (same world seed and shape otherwise).

Scores: ``megadistill.eval.evaluate`` -> ``{"fd", "adherence", "temporal_error"}``. Temporal error
(mean distance of blob centres from their straight-line fit, latent px) is comparable across lengths;
FD is not (the features of a longer clip are another space), so the 2x FD is only compared with
the noise floor of that world.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from megadistill.data.synthetic import SyntheticVideoWorld, mix_seed
from megadistill.eval.metrics import noise_floor_fd
from megadistill.eval.quality import eval_set, score, start_noise
from megadistill.methods.causal_rollout import block_rollout


def world_of_length(world: SyntheticVideoWorld, frames: int) -> SyntheticVideoWorld:
    """The same world (seed, shape, motion rules) with clips of ``frames`` latent frames."""
    if frames == world.frames:
        return world
    return SyntheticVideoWorld(**{**world.config(), "frames": int(frames)})


@torch.no_grad()
def generate_causal(model, adapter, captions: Sequence[str], timesteps: torch.Tensor, latent_shape: Sequence[int],
                    seed: int, batch_size: int = 64, context_timestep: float = 0.0) -> torch.Tensor:
    """Clips ``[N, C, L, H, W]`` (float32, CPU) of the block-causal ``model`` for ``captions``.

    Each block runs every step of ``timesteps`` (predict x0, re-noise to the next step), then its
    clean output refreshes the KV cache at ``context_timestep`` (1000-step scale). L =
    ``latent_shape[1]`` may exceed the training length: with a local window the cache stays bounded.
    No guidance (a distilled student has it baked in). The re-noising draws come from one generator
    per batch seeded by ``(seed, first index)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = adapter.frames_per_block(model)
    frames = int(latent_shape[1])
    if frames % n:
        raise ValueError(f"{frames} latent frames are not a multiple of the model's {n} frames per block")
    out = []
    for start in range(0, len(captions), batch_size):
        batch = adapter.prepare_batch({"prompts": list(captions[start:start + batch_size])}, "zeros")
        device = batch.latents.device
        noise = torch.stack([start_noise(start + i, latent_shape, seed)
                             for i in range(batch.batch_size)]).to(device, batch.latents.dtype)
        g = torch.Generator(device=device).manual_seed(mix_seed("quality-causal", seed, start))
        x = block_rollout(adapter, model, batch.cond, noise, timesteps, [len(timesteps) - 1] * (frames // n),
                          context_timestep=context_timestep, generator=g)
        out.append(x.float().cpu())
    return torch.cat(out)


def causal_row(model, adapter, world: SyntheticVideoWorld, timesteps: torch.Tensor, num_samples: int, seed: int,
               batch_size: int = 64, context_timestep: float = 0.0) -> Dict[str, Any]:
    """``{"fd", "adherence", "temporal_error", "real_temporal_error", "noise_floor_fd"}`` of the
    student generating ``world.frames`` frames, scored against that world's real clips."""
    data = eval_set(world, num_samples, seed)
    clips = generate_causal(model, adapter, data.captions, timesteps, world.latent_shape, seed, batch_size,
                            context_timestep)
    row = score(clips, data, world)
    row["real_temporal_error"] = score(data.real, data, world)["temporal_error"]
    row["noise_floor_fd"] = noise_floor_fd(world, num_samples, seed)
    return row


def causal_bar(fd_1x: float, temporal_1x: float, temporal_2x: float, bidirectional_fd: Optional[float],
               fd_factor: float = 1.2, temporal_factor: float = 1.5) -> Dict[str, Any]:
    """The causal quality bar: ``fd_1x <= fd_factor * bidirectional_fd`` and ``temporal_2x <=
    temporal_factor * temporal_1x``. ``met`` is False when the bidirectional FD is unknown."""
    fd_ratio = None if bidirectional_fd is None else fd_1x / bidirectional_fd
    temporal_ratio = temporal_2x / temporal_1x
    met = fd_ratio is not None and fd_ratio <= fd_factor and temporal_ratio <= temporal_factor
    return {"fd_ratio_1x": fd_ratio, "temporal_ratio_2x": temporal_ratio, "fd_factor": fd_factor,
            "temporal_factor": temporal_factor, "met": bool(met)}


__all__ = ["world_of_length", "generate_causal", "causal_row", "causal_bar"]
