#!/usr/bin/env python
"""Reproduce the shipped tiny teacher (configs/weights/tiny_teacher) and check its quality.

    python tools/train_tiny_teacher.py                      # every stage, export, evaluate
    python tools/train_tiny_teacher.py --checkpoint DIR     # export + evaluate a finished last stage

The teacher is trained with the ``finetune`` method (flow matching with CFG dropout on the
synthetic blob world) through ``launch/pretrain_dmd.py``, the launcher of every run, in the stages
of ``STAGES`` (see docs/QUALITY.md for why), each initialised from the EMA weights of the one
before: ``configs/tiny_teacher_finetune.yaml`` with the stage's overrides. Stages 1-3 ran on the
first version of the world (``FIRST_WORLD``: slower blobs over a stronger background), where the
model learnt colours but never the direction words; stage 4 runs on the current world, where it
learnt them, but often gave each of two blobs the other's direction. Stage 5 re-initialises the text
path and relearns the captions from the ``tiny-positional`` text encoder, whose outputs carry word
order; there two-blob captions are bound. ``--max_steps`` sets the last stage's length.

Then the EMA weights of the last stage's checkpoint are exported in Wan's native format
(``diffusion_pytorch_model.safetensors`` + ``config.json``) to ``--export``, and the exported
teacher (50-step Euler ODE with CFG) and a randomly initialised model of the same shape are
sampled on the same captions and noise. The teacher passes when its prompt adherence is >= 0.9
and its FD <= 0.2 x the untrained model's FD. Everything runs with a fixed seed; on one machine
the run repeats exactly.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch

DEFAULT_CONFIG = "configs/tiny_teacher_finetune.yaml"
DEFAULT_EXPORT = "configs/weights/tiny_teacher"
# The world's settings before the current defaults (megadistill/data/synthetic.py).
FIRST_WORLD = ["data.world.travel_range=[0.5,0.9]", "data.world.margin=1.0", "data.world.background_std=1.0"]
# The text encoder of stages 1-4; stage 5 switches to the config's "tiny-positional".
FIRST_ENCODER = ["pipeline_config.text_encoder=tiny"]
# (name, steps, overrides of the config, seed to re-initialise the text path with or None). Stage 1's
# text length 32 cut the end off the longest two-blob captions, hence the config's 40 from stage 2
# on. Stage 5 refills the text embedding and every cross-attention of stage 4's teacher (the rest
# kept) and relearns the captions from an encoder that leans on word order.
STAGES = [
    ("stage1", 1750, ["pipeline_config.text_len=32", "training.warmup_steps=100", "training.ema.start_step=300"]
     + FIRST_WORLD + FIRST_ENCODER, None),
    ("stage2", 2000, FIRST_WORLD + FIRST_ENCODER, None),
    ("stage3", 4000, ["training.ema.start_step=0"] + FIRST_WORLD + FIRST_ENCODER, None),
    ("stage4", 24000, ["training.ema.start_step=0"] + FIRST_ENCODER, None),
    ("stage5", 22000, ["training.ema.start_step=0"], 7),
]


def is_text_path(name: str) -> bool:
    """Parameters that turn text states into what the video tokens attend to."""
    return name.startswith("text_embedding.") or ".cross_attn." in name


def reinit_text_path(src: str, dst: str, seed: int) -> Path:
    """Copy the native checkpoint ``src`` to ``dst`` with its text path refilled by the model's
    seeded initialisation (``init_value(name, shape, seed)``)."""
    from megadistill.models.wan.dit import WanDiT, init_value

    model = WanDiT.from_pretrained(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_text_path(name):
                p.copy_(init_value(name, p.shape, seed).to(p.dtype))
    model.save_pretrained(dst, format="native", overwrite=True)
    print(f"re-initialised the text path of {src} (seed {seed}) -> {dst}", flush=True)
    return Path(dst)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="finetune run config of the teacher")
    ap.add_argument("--output_dir", default="outputs/tiny_teacher", help="training output folder")
    ap.add_argument("--max_steps", type=int, default=None, help="length of the last stage (default: STAGES)")
    ap.add_argument("--checkpoint", default=None,
                    help="skip training: export this trainer checkpoint (a step_XXXXXXXX folder)")
    ap.add_argument("--export", default=DEFAULT_EXPORT, help="where the teacher weights are written")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the exported weights")
    ap.add_argument("--eval_samples", type=int, default=512, help="clips per set for the quality check")
    ap.add_argument("--guidance_scale", type=float, default=2.0, help="CFG scale, standard convention")
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (captions and noise)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every stage (repeatable)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the report to this file")
    return ap.parse_args(argv)


def train(config: str, output_dir: str, max_steps=None, overrides=()) -> Path:
    """Run the launcher in-process; returns the last checkpoint folder."""
    from launch.pretrain_dmd import main as launch_main
    from megadistill.train.checkpoint import latest_checkpoint

    argv = ["--config", config, "--output_dir", output_dir]
    for o in overrides:
        argv += ["--set", o]
    if max_steps:
        argv += ["--max_steps", str(max_steps)]
    rc = launch_main(argv)
    if rc:
        raise SystemExit(f"training failed (launcher exit code {rc})")
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        raise SystemExit(f"training wrote no checkpoint under {output_dir}")
    return ckpt


def export_teacher(cfg, checkpoint: Path, dst: str, dtype: str, text_len=None) -> Path:
    """Write the checkpoint's (EMA) student weights as a native Wan checkpoint at ``dst``
    (``cfg``: the run config that wrote the checkpoint; ``text_len``: the text length the exported
    model pads to, default the run's. No weight depends on it)."""
    from megadistill.eval.quality import load_role_model
    from megadistill.models.wan.dit import WanDiT
    from megadistill.train.quality_report import student_weights

    try:
        weights = student_weights(checkpoint)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    model = load_role_model(cfg, "student", weights)
    if text_len is not None and text_len != model.config.text_len:
        resized = WanDiT(model.config.replace(text_len=text_len))
        resized.load_state_dict(model.state_dict())
        model = resized
    model.save_pretrained(dst, format="native", dtype=None if dtype == "fp32" else dtype, overwrite=True)
    print(f"exported {weights} -> {dst}", flush=True)
    return Path(dst)


def check_teacher(cfg, teacher_path: str, num_samples: int, guidance_scale: float, seed: int) -> dict:
    """Metrics of the exported teacher and of an untrained model (50-step Euler with CFG)."""
    from megadistill.config import config_from_dict, config_to_dict
    from megadistill.diffusion import sample_timesteps_uniform
    from megadistill.eval.probes import direction_gain
    from megadistill.eval.quality import (SamplingSpec, build_adapter, load_role_model, quality_report,
                                          world_of)

    d = config_to_dict(cfg)
    untrained_cfg = config_from_dict(d)
    d["models"]["student"] = {"path": os.path.abspath(teacher_path)}
    teacher_cfg = config_from_dict(d)
    teacher = load_role_model(teacher_cfg, "student")
    untrained = load_role_model(untrained_cfg, "student")
    adapter = build_adapter(teacher_cfg, {"student": teacher})
    sched = adapter.noise_scheduler
    steps50 = sample_timesteps_uniform(50, shift=sched.shift, num_train_timesteps=sched.num_train_timesteps)
    specs = [SamplingSpec("teacher_50", teacher, steps50, "ode", guidance_scale, "cfg"),
             SamplingSpec("untrained_50", untrained, steps50, "ode", guidance_scale, "cfg")]
    world = world_of(teacher_cfg)
    report, _ = quality_report(specs, adapter, world, num_samples, seed)
    # How much the teacher's loss rises when the direction words are flipped: 0 = ignores them.
    report["teacher_direction_gain"] = {str(k): v for k, v in direction_gain(teacher, adapter, world).items()}
    report["fd_ratio_teacher_vs_untrained"] = report["teacher_50"]["fd"] / report["untrained_50"]["fd"]
    report["passes"] = bool(report["teacher_50"]["adherence"] >= 0.9
                            and report["fd_ratio_teacher_vs_untrained"] <= 0.2)
    return report


def main(argv=None):
    args = parse_args(argv)
    from megadistill.checkpoint import write_json_atomic
    from megadistill.config import load_config

    start = time.perf_counter()
    torch.manual_seed(0)
    cfg = load_config(args.config, args.set)
    checkpoint = args.checkpoint
    if checkpoint is None:
        init = None
        for i, (name, steps, overrides, reinit_seed) in enumerate(STAGES):
            last = i == len(STAGES) - 1
            if reinit_seed is not None:
                if init is None:
                    raise SystemExit(f"{name} re-initialises the text path of the stage before; it cannot be first")
                init = str(reinit_text_path(init, os.path.join(args.output_dir, f"{name}_init"), reinit_seed))
            overrides = overrides + args.set + ([f"models.student.path={os.path.abspath(init)}"] if init else [])
            checkpoint = train(args.config, os.path.join(args.output_dir, name),
                               args.max_steps if last and args.max_steps else steps, overrides)
            if not last:  # the next stage starts from this one's EMA weights, at the config's text length
                init = os.path.join(args.output_dir, f"{name}_teacher")
                export_teacher(load_config(args.config, overrides), checkpoint, init, "fp32",
                               text_len=cfg.pipeline_config.text_len)
    export_teacher(cfg, checkpoint, args.export, args.dtype)
    report = check_teacher(cfg, args.export, args.eval_samples, args.guidance_scale, args.seed)
    report["wall_s"] = time.perf_counter() - start
    text = json.dumps(report, indent=1)
    print(text, flush=True)
    if args.json:
        write_json_atomic(args.json, text + "\n")
    return 0 if report["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
