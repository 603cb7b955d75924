#!/usr/bin/env python
"""Generate videos (latents + GIF previews) from a training checkpoint or a Wan model.

    python launch/sample.py --checkpoint outputs/tiny_dmd2 --role student --prompts prompts.txt \\
        --steps 1000,750,500,250 --out samples/
    python launch/sample.py --checkpoint Wan2.1-T2V-1.3B --prompts "a red fox in the snow" --num-steps 50 \\
        --guidance-scale 5 --text-encoder Wan2.1-T2V-1.3B --vae Wan2.1-T2V-1.3B --latent-shape 16 21 60 104 --out s/

``--checkpoint``: a training checkpoint (a ``step_XXXXXXXX`` folder or a run's output folder, whose
newest checkpoint is taken; any saved role, ``<role>_ema`` for an EMA; see tools/export.py) or a
Wan DiT checkpoint in any format (native, diffusers, megadistill). From a training checkpoint the
run config supplies the defaults of the latent shape, text encoder, flow shift and step list.

Timesteps: ``--steps`` (a few-step list, warped onto the shifted grid with ``--warp``) or
``--num-steps`` (uniform on the shifted schedule). ``--sampler``: ``sde`` (DMD: predict x0, re-noise;
default with ``--steps``) or ``ode`` (Euler; default with ``--num-steps``). Guidance: ``--guidance-scale``
with ``--guidance-convention cfg`` (uncond + s (cond - uncond)) or ``dmd`` (cond + g (cond - uncond)),
unconditional text = ``--negative-prompt`` (default empty).

``--causal``: the checkpoint is a block-causal student (self-forcing / ODE-init) and each video is
streamed block by block with its KV cache: every block of ``--num-frame-per-block`` latent frames runs
the few-step list (predict x0, re-noise), then its output is run once more at ``--context-noise`` to
write the cache for the next block. ``--num-frames`` may exceed the training length; with
``--local-attn-size`` (and ``--sink-size``) the cache stays bounded. Reports frames/s and the time to
the first block. Block size, window and sinks default to the run config's pipeline_config.

Writes ``<out>/sample_0000.safetensors`` (``latents [C, F, H, W]``, prompt and settings in the
metadata), ``<out>/sample_0000.gif`` (decoded by ``--vae``, else a fixed projection of the latent
channels) and ``<out>/samples.json``. The starting noise of sample ``i`` depends only on
``(--seed, i)``; with ``--sampler sde`` the re-noising also depends on the batch (``--batch-size``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megadistill.checkpoint import CheckpointError  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VAE_TIME_STRIDE = 4  # Wan2.1's VAE: latent frame f > 0 stands for 4 video frames


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (step folder / run folder) or model path")
    p.add_argument("--role", default="student", help="role of a training checkpoint (default student)")
    p.add_argument("--prompts", required=True, help="a prompt file (one per line) or the prompt text itself")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", default=None, help="few-step list, e.g. 1000,750,500,250")
    steps.add_argument("--num-steps", type=int, default=None, help="uniform steps on the shifted schedule")
    p.add_argument("--warp", action=argparse.BooleanOptionalAction, default=None,
                   help="warp --steps onto the shifted grid (default: the run config's warp_denoising_step)")
    p.add_argument("--shift", type=float, default=None, help="flow shift (default: run config, else 5.0)")
    p.add_argument("--sampler", choices=("ode", "sde"), default=None, help="default sde with --steps, ode otherwise")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale (default none)")
    p.add_argument("--guidance-convention", choices=("cfg", "dmd"), default="cfg",
                   help="cfg: uncond + s*(cond - uncond); dmd: cond + g*(cond - uncond)")
    p.add_argument("--negative-prompt", default="", help="text of the unconditional prediction (default empty)")
    p.add_argument("--text-encoder", default=None, help="text encoder folder/file or 'tiny' (default: run config)")
    p.add_argument("--latent-shape", type=int, nargs=4, default=None, metavar=("C", "F", "H", "W"),
                   help="latent shape (default: run config)")
    p.add_argument("--vae", default=None, help="Wan VAE (folder or Wan2.1_VAE.pth) to decode the previews")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--fps", type=float, default=16.0, help="frame rate of the GIFs")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="model dtype")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, when the checkpoint cannot tell")
    p.add_argument("--causal", action="store_true", help="block-causal streaming generation with a KV cache")
    p.add_argument("--num-frames", type=int, default=None,
                   help="--causal: latent frames to generate (default: the latent shape's F; more runs past the "
                        "training length, with --local-attn-size in bounded memory)")
    p.add_argument("--num-frame-per-block", type=int, default=None,
                   help="--causal: frames per block (default: run config)")
    p.add_argument("--local-attn-size", type=int, default=None,
                   help="--causal: attention window in latent frames, -1 = whole prefix (default: run config)")
    p.add_argument("--sink-size", type=int, default=None, help="--causal: attention-sink frames (default: run config)")
    p.add_argument("--context-noise", type=float, default=None,
                   help="--causal: timestep of the cache refresh (default: the run's "
                        "method_config.context_noise, else 0)")
    return p.parse_args(argv)


def read_prompt_arg(text: str) -> list:
    from megadistill.data.prompts import read_prompts

    if os.path.isfile(text):
        return read_prompts(text)
    if not text.strip():
        raise ValueError("--prompts is empty: give a prompt file or the prompt text")
    return [text.strip()]


def export_tool():
    """tools/export.py (reading roles of training checkpoints), loaded from its file: ``tools`` is not a
    package, and a name lookup could find another ``tools`` folder on the path."""
    name = "megadistill_tools_export"
    if name not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "export.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def load_model(path, role: str, dtype, num_heads=None, causal=None) -> tuple:
    """``(WanDiT, run config dict or None, description)``; with ``causal`` (a function of the run
    config dict or None -> CausalWanDiT keyword arguments) the block-causal DiT instead."""
    from megadistill.models.wan import WanDiT

    tool = export_tool()
    try:
        step_dir = tool.find_checkpoint(path)
    except CheckpointError:
        step_dir = None
    cls, kwargs = WanDiT, {}
    if causal is not None:
        from megadistill.models.wan.causal import CausalWanDiT

        run_cfg = None if step_dir is None else tool.read_meta(step_dir).get("config")
        cls, kwargs = CausalWanDiT, causal(run_cfg)
    if step_dir is None:
        return cls.from_pretrained(path, dtype=dtype, **kwargs).eval(), None, f"model {path}"
    tensors, config, meta = tool.read_role(step_dir, role, num_heads)
    with torch.device("meta"):
        model = cls(config, **kwargs)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{step_dir} role {role!r} does not fit a Wan DiT of its config: {e}") from None
    return model.to(dtype).eval(), meta.get("config"), f"{role} of {step_dir} (step {meta.get('step')})"


def resolve_settings(a, run_cfg: dict | None) -> dict:
    """Command line over run config over built-in defaults."""
    pc = (run_cfg or {}).get("pipeline_config", {})
    mc = (run_cfg or {}).get("method_config", {})
    if a.steps is not None:
        try:
            steps = [int(s) for s in a.steps.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--steps {a.steps!r}: give integers separated by commas, e.g. 1000,750,500,250") from None
    elif a.num_steps is None:
        steps = mc.get("denoising_steps")
        if steps is None:
            raise ValueError("give --steps (a few-step list) or --num-steps (uniform steps)")
    else:
        steps = None
    shape = a.latent_shape or pc.get("latent_shape")
    if shape is None:
        raise ValueError("give --latent-shape C F H W (the checkpoint has no run config to take it from)")
    return {
        "steps": steps, "num_steps": a.num_steps,
        "warp": a.warp if a.warp is not None else bool(mc.get("warp_denoising_step", False)),
        "shift": a.shift if a.shift is not None else float(pc.get("flow_shift", 5.0)),
        "num_train_timesteps": int(pc.get("num_train_timesteps", 1000)),
        "sampler": a.sampler or ("sde" if steps is not None else "ode"),
        "text_encoder": a.text_encoder or pc.get("text_encoder"),
        "latent_shape": [int(s) for s in shape],
    }


def _save_latents(latents: torch.Tensor, path: Path, metadata: dict):
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({"latents": latents.contiguous().cpu()}, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate(a) -> dict:
    from megadistill.checkpoint import write_json_atomic
    from megadistill.data.video_io import latents_to_preview, write_video
    from megadistill.diffusion import FlowMatchScheduler
    from megadistill.models.wan.family import load_text_encoder
    from megadistill.train.sampling import Guidance, noise_for, sample_video, sampling_timesteps

    if a.causal:
        return generate_causal(a)
    if a.batch_size < 1:
        raise ValueError(f"--batch-size {a.batch_size} must be >= 1")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = read_prompt_arg(a.prompts)
    model, run_cfg, what = load_model(a.checkpoint, a.role, DTYPES[a.dtype], a.num_heads)
    model = model.to(device)
    s = resolve_settings(a, run_cfg)
    if s["latent_shape"][0] != model.config.in_dim:
        raise ValueError(f"--latent-shape has {s['latent_shape'][0]} channels; the model takes {model.config.in_dim}")
    if s["text_encoder"] is None:
        raise ValueError("give --text-encoder (a folder/file, or 'tiny'); the checkpoint's run config names none")
    encoder = load_text_encoder(s["text_encoder"], device, text_len=model.config.text_len,
                                text_dim=model.config.text_dim)
    if encoder.dim != model.config.text_dim:
        raise ValueError(f"text encoder {s['text_encoder']} gives {encoder.dim}-wide states; the model takes "
                         f"text_dim={model.config.text_dim}")
    vae = None
    if a.vae:
        from megadistill.models.wan.vae import WanVAE

        vae = WanVAE.from_pretrained(a.vae, device=device)
    scheduler = FlowMatchScheduler(s["num_train_timesteps"], s["shift"])
    timesteps = sampling_timesteps(scheduler, steps=s["steps"], num_steps=s["num_steps"], warp=s["warp"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[a.dtype]
    settings = {"checkpoint": what, "sampler": s["sampler"], "timesteps": [round(t, 4) for t in timesteps.tolist()],
                "shift": s["shift"], "guidance_scale": a.guidance_scale, "guidance_convention": a.guidance_convention,
                "seed": a.seed}
    index, sample_seconds = [], 0.0
    for start in range(0, len(prompts), a.batch_size):
        batch = prompts[start:start + a.batch_size]
        text, _ = encoder.encode(batch)
        text = text.to(device, dtype)
        guidance = None
        if a.guidance_scale is not None:
            neg, _ = encoder.encode([a.negative_prompt] * len(batch))
            neg = neg.to(device, dtype)
            guidance = Guidance(lambda x, t, neg=neg: model(x, t, neg), a.guidance_scale, a.guidance_convention)
        noise = torch.stack([noise_for(start + i, s["latent_shape"], a.seed) for i in range(len(batch))]).to(device, dtype)
        generator = torch.Generator(device).manual_seed(a.seed * 1_000_003 + start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        latents = sample_video(lambda x, t, text=text: model(x, t, text), noise, timesteps, scheduler,
                               sampler=s["sampler"], generator=generator, guidance=guidance)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sample_seconds += time.perf_counter() - t0
        for i, prompt in enumerate(batch):
            name = f"sample_{start + i:04d}"
            lat = latents[i].float().cpu()
            _save_latents(lat, out / f"{name}.safetensors", {"prompt": prompt, **settings})
            write_video(latents_to_preview(latents[i].float(), vae=vae), out / f"{name}.gif", fps=a.fps)
            index.append({"latents": f"{name}.safetensors", "preview": f"{name}.gif", "prompt": prompt})
    write_json_atomic(out / "samples.json", json.dumps({**settings, "samples": index}, indent=2) + "\n")
    n, f = len(prompts), s["latent_shape"][1]
    video_frames = 1 + VAE_TIME_STRIDE * (f - 1)
    return {"samples": n, "seconds": sample_seconds, "latent_frames": f, "video_frames": video_frames,
            "frames_per_s": n * video_frames / sample_seconds if sample_seconds > 0 else float("inf"),
            "nfe": len(timesteps) * (1 if guidance is None or guidance.is_identity else 2), "out": str(out),
            "what": what}


def causal_settings(a):
    """CausalWanDiT keyword arguments: command line over the run config's pipeline_config."""
    def kwargs(run_cfg):
        pc = (run_cfg or {}).get("pipeline_config", {})
        n = a.num_frame_per_block or int(pc.get("num_frame_per_block", 3))
        window = a.local_attn_size if a.local_attn_size is not None else int(pc.get("local_attn_size", -1))
        sinks = a.sink_size if a.sink_size is not None else int(pc.get("sink_size", 0))
        if window == 0 or window < -1:
            raise ValueError(f"--local-attn-size {window}: give -1 (whole prefix) or a window >= one block")
        return {"num_frame_per_block": n, "local_window_frames": None if window == -1 else window,
                "sink_frames": sinks}
    return kwargs


def generate_causal(a) -> dict:
    """Block-by-block generation with the KV cache (``megadistill.methods.causal_rollout``): each block
    runs the whole step list (predict x0, re-noise), then its output refreshes the cache at the context
    timestep. Blocks are timed as they stream out: time to the first block and frames/s."""
    from megadistill.checkpoint import write_json_atomic
    from megadistill.data.video_io import latents_to_preview, write_video
    from megadistill.diffusion import FlowMatchScheduler
    from megadistill.methods.causal_rollout import block_rollout
    from megadistill.models.wan.adapter import WanAdapter
    from megadistill.models.wan.family import load_text_encoder
    from megadistill.train.sampling import noise_for, sampling_timesteps

    if a.guidance_scale is not None:
        raise ValueError("--causal samples a guidance-free (distilled) student; drop --guidance-scale")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size {a.batch_size} must be >= 1")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[a.dtype]
    prompts = read_prompt_arg(a.prompts)
    model, run_cfg, what = load_model(a.checkpoint, a.role, dtype, a.num_heads, causal=causal_settings(a))
    model = model.to(device)
    s = resolve_settings(a, run_cfg)
    if s["sampler"] != "sde":
        raise ValueError("--causal samples with the few-step sampler (predict x0, re-noise per block); give --steps "
                         "or let the run config supply them, without --sampler ode")
    context = a.context_noise if a.context_noise is not None else \
        float((run_cfg or {}).get("method_config", {}).get("context_noise", 0.0))
    n = model.num_frame_per_block
    frames = a.num_frames or s["latent_shape"][1]
    if frames < 1 or frames % n:
        raise ValueError(f"--num-frames {frames} must be a positive multiple of the {n} frames per block")
    shape = [s["latent_shape"][0], frames, *s["latent_shape"][2:]]
    if s["text_encoder"] is None:
        raise ValueError("give --text-encoder (a folder/file, or 'tiny'); the checkpoint's run config names none")
    encoder = load_text_encoder(s["text_encoder"], device, text_len=model.config.text_len,
                                text_dim=model.config.text_dim)
    scheduler = FlowMatchScheduler(s["num_train_timesteps"], s["shift"])
    timesteps = sampling_timesteps(scheduler, steps=s["steps"], num_steps=s["num_steps"], warp=s["warp"])
    T = scheduler.num_train_timesteps
    adapter = WanAdapter(None, scheduler, latent_shape=shape, device=device, latent_dtype=dtype)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": what, "sampler": "causal", "timesteps": [round(t, 4) for t in timesteps.tolist()],
                "shift": s["shift"], "frames_per_block": n, "local_attn_size": model.local_window_frames,
                "sink_size": model.sink_frames, "context_noise": context, "seed": a.seed}
    index, seconds, first_block = [], 0.0, []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for start in range(0, len(prompts), a.batch_size):
        batch = prompts[start:start + a.batch_size]
        text, _ = encoder.encode(batch)
        cond = {"text_states": text.to(device, dtype)}
        noise = torch.stack([noise_for(start + i, shape, a.seed) for i in range(len(batch))]).to(device, dtype)
        generator = torch.Generator(device).manual_seed(a.seed * 1_000_003 + start)
        sync()
        t0 = time.perf_counter()

        def on_block(b, x0, t0=t0):
            if b == 0:
                sync()
                first_block.append(time.perf_counter() - t0)

        latents = block_rollout(adapter, model, cond, noise, timesteps, [len(timesteps) - 1] * (frames // n),
                                context_timestep=context * T / 1000.0, generator=generator, on_block=on_block)
        sync()
        seconds += time.perf_counter() - t0
        for i, prompt in enumerate(batch):
            name = f"sample_{start + i:04d}"
            _save_latents(latents[i].float().cpu(), out / f"{name}.safetensors", {"prompt": prompt, **settings})
            write_video(latents_to_preview(latents[i].float()), out / f"{name}.gif", fps=a.fps)
            index.append({"latents": f"{name}.safetensors", "preview": f"{name}.gif", "prompt": prompt})
    write_json_atomic(out / "samples.json", json.dumps({**settings, "samples": index}, indent=2) + "\n")
    video_frames = 1 + VAE_TIME_STRIDE * (frames - 1)
    return {"samples": len(prompts), "seconds": seconds, "latent_frames": frames, "video_frames": video_frames,
            "frames_per_s": len(prompts) * video_frames / seconds if seconds > 0 else float("inf"),
            "first_block_s": sum(first_block) / len(first_block),
            "nfe": (frames // n) * (len(timesteps) + 1) - 1, "out": str(out), "what": what}


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        with torch.no_grad():  # scoped: main() is also called in-process (tests, other tools)
            r = generate(a)
    except (CheckpointError, ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sampled {r['samples']} videos from {r['what']}: {r['nfe']} model calls each, {r['seconds']:.2f} s, "
          f"{r['frames_per_s']:.2f} frames/s ({r['video_frames']} video frames = {r['latent_frames']} latent "
          f"frames per video) -> {r['out']}")
    if "first_block_s" in r:
        print(f"streamed block by block: first block after {r['first_block_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
