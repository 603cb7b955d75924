"""Validation samples during training: the method's trained role (and its EMA) generates fixed
prompts from fixed noise with the method's own sampler; rank 0 writes latents, GIF previews and
TensorBoard images. Every rank runs the forwards (ZeRO-3 gathers weights collectively)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megadistill.data.video_io import latents_to_preview, write_video

from .sampling import Guidance, noise_for, sample_video


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def default_prompts(cfg, data, n: int = 4) -> list:
    """``logging.validation_prompts``, else the first ``n`` prompts of a copy of the data stream
    (call it before training consumes the stream, so a resumed run validates the same prompts)."""
    if cfg.logging.validation_prompts:
        return list(cfg.logging.validation_prompts)
    probe = copy.deepcopy(data)
    prompts = []
    while len(prompts) < n:
        prompts += list(next(probe)["prompts"])
    return prompts[:n]


@torch.no_grad()
def generate(run, prompts, module=None, seed: int = 0):
    """Latents ``[N, C, F, H, W]`` for ``prompts`` from the method's sampling spec."""
    spec = run.method.sampling_spec(run.cfg.logging.sample_steps)
    handle = run.bundle[spec.role]
    net = module if module is not None else handle
    adapter = run.adapter
    batch = adapter.prepare_batch({"prompts": list(prompts)}, "zeros")
    shape = tuple(batch.latents.shape[1:])
    noise = torch.stack([noise_for(i, shape, seed) for i in range(len(prompts))]).to(batch.latents)

    def call(cond):
        return lambda x, t: adapter.predict_flow(_Net(net), x, t, cond)

    timesteps = torch.tensor(spec.timesteps, dtype=torch.float64)
    if spec.causal:
        # Block by block with the KV cache, each block denoised through the whole step list.
        from megadistill.methods.causal_rollout import block_rollout

        n = adapter.frames_per_block(net)
        exits = [len(timesteps) - 1] * (shape[1] // n)
        return block_rollout(adapter, net, batch.cond, noise, timesteps, exits,
                             context_timestep=spec.context_timestep, generator=torch.Generator().manual_seed(seed))
    guidance = None
    if spec.guidance_scale is not None:
        guidance = Guidance(call(adapter.negative_cond(batch)), spec.guidance_scale, spec.guidance_convention)
    g = torch.Generator().manual_seed(seed)
    return sample_video(call(batch.cond), noise, timesteps, adapter.noise_scheduler, sampler=spec.sampler,
                        generator=g, guidance=guidance)


class _Net:
    """Makes a bare module look like a role handle to the adapter (only ``__call__`` is used)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def _ema_module(handle):
    """A copy of the role's module holding its EMA weights (plain modules only)."""
    if handle.ema is None or getattr(handle.ema, "partitioned", False):
        return None
    module = copy.deepcopy(handle.module)
    handle.ema.copy_to(module)
    return module


def run_validation(run, step: int, output_dir, prompts, writer=None, seed: int = 0):
    spec = run.method.sampling_spec(run.cfg.logging.sample_steps)
    handle = run.bundle[spec.role]
    variants = {spec.role: None}
    ema = _ema_module(handle)
    if ema is not None:
        variants[f"{spec.role}_ema"] = ema
    was_training = handle.module.training
    handle.module.eval()
    try:
        results = {name: generate(run, prompts, module, seed) for name, module in variants.items()}
    finally:
        handle.module.train(was_training)
    if _rank() != 0:
        return None
    out = Path(output_dir) / "samples" / f"step_{step:08d}"
    out.mkdir(parents=True, exist_ok=True)
    for name, latents in results.items():
        save_file({"latents": latents.float().cpu().contiguous()}, str(out / f"{name}.safetensors"))
        (out / f"{name}_prompts.txt").write_text("\n".join(prompts) + "\n")
        for i, lat in enumerate(latents):
            frames = latents_to_preview(lat.float().cpu())
            write_video(frames, out / f"{name}_{i:02d}.gif")
            if writer is not None:
                writer.add_images(f"samples/{name}/{i:02d}", torch.from_numpy(frames).permute(0, 3, 1, 2),
                                  step, dataformats="NCHW")
    return out
