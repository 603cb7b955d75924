#!/usr/bin/env python
"""Teacher ODE trajectories for ODE-init (``recipe.method: ode_init``), as WebDataset latent shards.

    python tools/generate_ode_pairs.py --teacher Wan2.1-T2V-14B --prompts prompts.txt \\
        --text-encoder Wan2.1-T2V-14B --latent-shape 16 21 60 104 --num-steps 50 \\
        --keep-steps 1000,750,500,250 --warp --guidance-scale 5 --guidance-convention cfg --out data/ode_pairs

For prompt ``i``: noise ``eps_i`` (a function of ``(--seed, i)`` only), Euler on the teacher's
(guided) flow over ``--num-steps`` uniform steps of the shifted schedule with the kept timesteps
inserted into that grid (so the trajectory passes through each of them exactly), from ``eps_i`` at
t = 1000 down to sigma 0. Stored per sample (format in ``megadistill.data.latents``): ``latents`` =
the clean endpoint, ``ode_states [K, C, F, H, W]`` = the states at the kept timesteps (the first,
t = 1000, is the noise itself), ``ode_timesteps [K]``, the prompt's text states and the prompt.

``--keep-steps`` is a few-step list on the 1000-step scale; with ``--warp`` it is warped onto the
shifted grid as ``warp_denoising_step`` does, and it must then equal the student's step list
(``method_config.denoising_steps`` / ``warp_denoising_step`` of the ode_init run).

``--teacher``: a Wan DiT checkpoint (any format), or a preset name (e.g. ``tiny``) for a random
teacher initialized from ``--teacher-seed`` (tests and smoke runs only). Guidance:
``--guidance-scale`` with an explicit ``--guidance-convention`` (cfg: uncond + s (cond - uncond);
dmd: cond + g (cond - uncond)), unconditional text = ``--negative-prompt`` (default empty).
``ode_pairs.json`` in ``--out`` records the settings. Exit status 0 on success, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="teacher checkpoint (any Wan format) or a preset name")
    p.add_argument("--teacher-seed", type=int, default=0, help="init seed of a preset teacher")
    p.add_argument("--prompts", required=True, help="prompt file, one prompt a line")
    p.add_argument("--text-encoder", required=True, help="text encoder folder/file, or 'tiny'")
    p.add_argument("--latent-shape", type=int, nargs=4, required=True, metavar=("C", "F", "H", "W"))
    p.add_argument("--num-steps", type=int, default=50, help="uniform Euler steps of the shifted schedule")
    p.add_argument("--keep-steps", default="1000,750,500,250", help="kept timesteps (1000-step scale)")
    p.add_argument("--warp", action="store_true", help="warp --keep-steps onto the shifted grid")
    p.add_argument("--shift", type=float, default=5.0, help="flow shift of the schedule")
    p.add_argument("--num-train-timesteps", type=int, default=1000)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--guidance-convention", choices=("cfg", "dmd"), default=None)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", required=True, help="output folder (must hold no shards unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="teacher dtype")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    return p.parse_args(argv)


def parse_steps(text: str) -> list:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--keep-steps {text!r}: give integers separated by commas, e.g. 1000,750,500,250") from None
    if not steps:
        raise ValueError("--keep-steps is empty")
    return steps


def load_teacher(spec: str, seed: int, dtype):
    from megadistill.models.wan import WanDiT, get_preset, init_weights

    if os.path.exists(spec):
        return WanDiT.from_pretrained(spec, dtype=dtype)
    try:
        config = get_preset(spec)
    except ValueError as e:
        raise ValueError(f"--teacher {spec!r} is neither an existing checkpoint nor a preset: {e}") from None
    return init_weights(WanDiT(config), seed=seed).to(dtype)


def trajectory_grid(a, scheduler):
    """``(grid, keep)``: the sampling grid with the kept timesteps inserted, and the kept timesteps."""
    from megadistill.diffusion import denoising_step_list, sample_timesteps_uniform
    from megadistill.methods.ode_init import trajectory_timesteps

    if a.num_steps < 1:
        raise ValueError(f"--num-steps {a.num_steps} must be >= 1")
    T = scheduler.num_train_timesteps
    keep = denoising_step_list(parse_steps(a.keep_steps), warp=a.warp, shift=scheduler.shift, num_train_timesteps=T)
    grid = sample_timesteps_uniform(a.num_steps, shift=scheduler.shift, num_train_timesteps=T)
    return trajectory_timesteps(grid, keep), keep


def generate(a) -> dict:
    from megadistill.checkpoint import write_json_atomic
    from megadistill.data.latents import write_latent_shards
    from megadistill.data.prompts import read_prompts
    from megadistill.diffusion import FlowMatchScheduler
    from megadistill.methods.ode_init import ode_trajectory
    from megadistill.models.wan.family import load_text_encoder
    from megadistill.train.sampling import Guidance, guided, noise_for

    if (a.guidance_scale is None) != (a.guidance_convention is None):
        raise ValueError("--guidance-scale and --guidance-convention go together: name the convention of the "
                         "scale (cfg: uncond + s*(cond - uncond); dmd: cond + g*(cond - uncond))")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size {a.batch_size} must be >= 1")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[a.dtype]
    prompts = read_prompts(a.prompts)
    teacher = load_teacher(a.teacher, a.teacher_seed, dtype).to(device).eval()
    shape = [int(s) for s in a.latent_shape]
    if shape[0] != teacher.config.in_dim:
        raise ValueError(f"--latent-shape has {shape[0]} channels; the teacher takes {teacher.config.in_dim}")
    encoder = load_text_encoder(a.text_encoder, device, text_len=teacher.config.text_len,
                                text_dim=teacher.config.text_dim)
    scheduler = FlowMatchScheduler(a.num_train_timesteps, a.shift)
    grid, keep = trajectory_grid(a, scheduler)
    negative = None
    if a.guidance_scale is not None:
        negative, _ = encoder.encode([a.negative_prompt])
        negative = negative.to(device, dtype)
    seconds = 0.0

    def samples():
        nonlocal seconds
        for start in range(0, len(prompts), a.batch_size):
            batch = prompts[start:start + a.batch_size]
            text, lens = encoder.encode(batch)
            text = text.to(device, dtype)
            predict = lambda x, t, text=text: teacher(x, t, text)  # noqa: E731
            if negative is not None:
                neg = negative.expand(len(batch), -1, -1)
                guide = Guidance(lambda x, t, neg=neg: teacher(x, t, neg), a.guidance_scale, a.guidance_convention)
                predict = guided(predict, guide)
            noise = torch.stack([noise_for(start + i, shape, a.seed) for i in range(len(batch))]).to(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                states, endpoint = ode_trajectory(predict, noise, grid, keep, scheduler)
            seconds += time.perf_counter() - t0
            for i, prompt in enumerate(batch):
                yield {"latents": endpoint[i].float().cpu(), "text_states": text[i, :int(lens[i])].float().cpu(),
                       "prompt": prompt, "ode_states": states[i].float().cpu(), "ode_timesteps": keep.clone()}

    shards = write_latent_shards(samples(), a.out, samples_per_shard=a.samples_per_shard, overwrite=a.overwrite)
    settings = {"teacher": a.teacher, "num_samples": len(prompts), "latent_shape": shape, "num_steps": a.num_steps,
                "grid": grid.tolist(), "keep_timesteps": keep.tolist(), "shift": a.shift,
                "guidance_scale": a.guidance_scale, "guidance_convention": a.guidance_convention,
                "negative_prompt": a.negative_prompt, "seed": a.seed, "shards": [p.name for p in shards]}
    write_json_atomic(os.path.join(a.out, "ode_pairs.json"), json.dumps(settings, indent=2) + "\n")
    return {"samples": len(prompts), "shards": len(shards), "seconds": seconds, "nfe": len(grid), "out": a.out}


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        r = generate(a)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r['samples']} ODE trajectories ({r['nfe']} teacher steps each, {r['seconds']:.2f} s) in "
          f"{r['shards']} shards -> {r['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
