#!/usr/bin/env python
"""Distill the shipped tiny teacher into a 4-step DMD2 student and measure both.

    python tools/bench_quality.py --quick                  # the README's main job, CPU, < 15 min
    python tools/bench_quality.py --json quality.json      # 6000 DMD2 steps, 512 clips per set

1. warm-starts the student (``--warm_start``, default ``configs/tiny_ode_init_dmd2_quality.yaml``;
   ``--warm_start none`` skips it): writes teacher ODE trajectories of ``--pairs`` synthetic
   captions (``tools/generate_ode_pairs.py``; the teacher's guided 50-step Euler ODE, through the
   student's step list) and regresses the student, initialised from the teacher, onto their clean
   endpoints with ``recipe.method: ode_init`` (docs/QUALITY.md: the teacher's few-step map from
   noise collapses blob positions, which DMD alone does not undo);
2. trains ``configs/tiny_dmd2_quality.yaml`` (student from the warm start, or from the teacher in
   ``configs/weights/tiny_teacher``; critic from the teacher) with ``launch/pretrain_dmd.py``; every
   stage runs in a subprocess: the same launcher, builder, method and trainer as any real run;
3. samples, on the same captions and starting noise:
   * ``teacher_50``: the teacher, 50 uniform steps of the shifted schedule, Euler ODE, with the
     guidance the DMD2 run uses for its real score (``method_config.guidance_scale`` under
     ``method_config.guidance_convention``);
   * ``teacher_4``: the teacher, Euler ODE with the same guidance on the student's 4-step list;
   * ``student_4``: the distilled student, DMD few-step sampling on its step list (predict x0,
     re-noise to the next step), no guidance;
   and real clips of the same captions (``real``);
4. prints one JSON object to stdout::

     {"real": {"fd", "adherence", "temporal_error"}, "teacher_50": {...}, "teacher_4": {...},
      "student_4": {...}, "noise_floor_fd": x, "wall_s": x}

   FDs are measured against an independent real set of the same size; ``noise_floor_fd`` is the
   FD of two real sets of that size. Training logs and the quality bar verdict go to stderr;
   ``--check`` makes the exit status 1 when the bar (docs/QUALITY.md) is missed. With enough
   clips (``fd_inf_min_samples``, 154 on this world) stderr also gets every row's FD extrapolated
   to infinitely many clips (FD_inf, free of the ~1/N bias behind ``noise_floor_fd``) and the
   bar's verdict on those figures, for information: ``--check`` judges the printed ``fd``.
"""
import argparse
import codecs
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch

from megadistill.checkpoint import write_json_atomic

ROOT = Path(_bootstrap.ROOT)
TEACHER = "configs/weights/tiny_teacher"
DEFAULT_CONFIG = "configs/tiny_dmd2_quality.yaml"
WARM_START_CONFIG = "configs/tiny_ode_init_dmd2_quality.yaml"
QUICK = {"max_steps": 2000, "samples": 256, "pairs": 1024, "warm_start_steps": 1000}
# The default mode is the quick recipe run to 6000 DMD2 steps (the GAN term keeps lowering FD until
# then: docs/QUALITY.md), scored on twice the clips; over half an hour on 2 cores.
FULL = {"max_steps": 6000, "samples": 512, "pairs": 1024, "warm_start_steps": 1000}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK['max_steps']} DMD2 steps, {QUICK['samples']} clips per set (default: "
                         f"{FULL['max_steps']} steps, {FULL['samples']} clips)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the JSON to this file")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="DMD2 run config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the run config (repeatable), e.g. --set method_config.guidance_scale=4")
    ap.add_argument("--max_steps", type=int, default=None, help="DMD2 training steps (overrides the mode's)")
    ap.add_argument("--warm_start", default=WARM_START_CONFIG, metavar="CONFIG",
                    help="ODE-init config of the student's warm start, or 'none' to distil from the teacher")
    ap.add_argument("--set_warm_start", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the warm-start config (repeatable)")
    ap.add_argument("--pairs", type=int, default=None,
                    help=f"teacher ODE trajectories of the warm start (quick {QUICK['pairs']}, default {FULL['pairs']})")
    ap.add_argument("--warm_start_steps", type=int, default=None,
                    help=f"ODE-init steps of the warm start (quick {QUICK['warm_start_steps']}, "
                         f"default {FULL['warm_start_steps']})")
    ap.add_argument("--samples", type=int, default=None, help="clips per evaluated set (overrides the mode's)")
    ap.add_argument("--teacher_steps", type=int, default=50, help="Euler steps of the teacher reference")
    ap.add_argument("--batch_size", type=int, default=64, help="clips per sampling batch")
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (captions, noise)")
    ap.add_argument("--output_dir", default=None,
                    help="training output folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training and sampling")
    ap.add_argument("--check", action="store_true", help="exit 1 when the quality bar is missed")
    return ap.parse_args(argv)


def run_logged(cmd, threads, what: str) -> None:
    """Run ``cmd``, its output (progress bar included) forwarded to stderr as it comes: stdout
    carries only the JSON."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(f"[bench_quality] {what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
        rc = proc.wait()
    if rc:
        raise SystemExit(f"{what} failed (exit code {rc}): {' '.join(cmd)}")


def train(config: str, overrides, output_dir: Path, max_steps: int, threads, what: str) -> Path:
    """``launch/pretrain_dmd.py`` in a subprocess; returns the final checkpoint folder."""
    from megadistill.train.checkpoint import latest_checkpoint

    cmd = [sys.executable, str(ROOT / "launch" / "pretrain_dmd.py"), "--config", config,
           "--output_dir", str(output_dir), "--max_steps", str(max_steps), "--checkpoint_every", "0"]
    for o in overrides:
        cmd += ["--set", o]
    run_logged(cmd, threads, what)
    ckpt = latest_checkpoint(str(output_dir))
    if ckpt is None:
        raise SystemExit(f"{what} wrote no checkpoint under {output_dir}")
    return Path(ckpt)


def write_captions(path: Path, count: int, seed: int, stream: str) -> None:
    """``count`` random captions of the synthetic world, one a line (the ODE-pair prompts); the
    caption stream is a function of ``(stream, seed)``."""
    from megadistill.data.synthetic import mix_seed, sample_captions

    if count < 1:
        raise ValueError(f"--pairs {count} must be >= 1")
    captions = sample_captions(count, torch.Generator().manual_seed(mix_seed(stream, seed)))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(captions) + "\n")
    tmp.replace(path)


def ode_pairs(ode_cfg, dmd2_cfg, out: Path, count: int, teacher_steps: int, seed: int, threads,
              stream: str) -> Path:
    """Teacher ODE trajectories through the ODE-init config's step list, as WebDataset shards, with
    the guidance of the DMD2 config's real score (as ``teacher_50``)."""
    pc = ode_cfg.pipeline_config
    steps, warp = step_list_settings(ode_cfg)
    prompts = out / "ode_prompts.txt"
    write_captions(prompts, count, seed, stream)
    pairs = out / "ode_pairs"
    cmd = [sys.executable, str(ROOT / "tools" / "generate_ode_pairs.py"), "--teacher", str(ROOT / TEACHER),
           "--prompts", str(prompts), "--text-encoder", pc.text_encoder,
           "--latent-shape", *map(str, pc.latent_shape), "--num-steps", str(teacher_steps),
           "--keep-steps", ",".join(map(str, steps)), "--shift", str(pc.flow_shift),
           "--batch-size", "64", "--samples-per-shard", "256", "--seed", str(seed), "--out", str(pairs),
           "--overwrite"]
    if warp:
        cmd.append("--warp")
    scale = dmd2_cfg.method_config.get("guidance_scale")
    if scale is not None:
        cmd += ["--guidance-scale", str(scale), "--guidance-convention",
                dmd2_cfg.method_config.get("guidance_convention", "cfg")]
    run_logged(cmd, threads, "ODE pairs")
    return pairs


def export_student(checkpoint: Path, like: Path, dst: Path) -> Path:
    """A Wan native folder (``config.json`` of ``like`` + the checkpoint's student weights), so the
    next stage's config can name it as a model ``path``."""
    weights = checkpoint / "student.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{checkpoint} holds no student.safetensors")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(like / "config.json", tmp / "config.json")
    shutil.copyfile(weights, tmp / "diffusion_pytorch_model.safetensors")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.replace(dst)
    return dst


def step_list_settings(cfg) -> tuple:
    """``(denoising_steps, warp_denoising_step)`` of a run config (DMD2's defaults where unset; ODE-init
    and self-forcing share them)."""
    from megadistill.methods.dmd2 import DMD2Config

    mc = cfg.method_config
    steps = mc.get("denoising_steps", DMD2Config.denoising_steps)
    return [int(t) for t in steps], bool(mc.get("warp_denoising_step", DMD2Config.warp_denoising_step))


def check_same_step_list(ode_cfg, dmd2_cfg, where: str) -> None:
    """The warm start regresses exactly the steps the DMD2 student samples with."""
    (a, warp_a), (b, warp_b) = step_list_settings(ode_cfg), step_list_settings(dmd2_cfg)
    if (a, warp_a) != (b, warp_b):
        raise ValueError(f"{where}: the warm start's step list (denoising_steps {a}, warp {warp_a}) differs "
                         f"from the DMD2 student's ({b}, warp {warp_b}); set both alike")


def warm_start_student(config: str, overrides, pairs: Path, run_dir: Path, export_dir: Path, steps: int,
                       threads, what: str) -> Path:
    """ODE-init of the student on ``pairs`` (a run in ``run_dir``); returns it exported to
    ``export_dir`` as a Wan native folder."""
    ckpt = train(config, [f"data.path={pairs}"] + list(overrides), run_dir, steps, threads, what)
    return export_student(ckpt, ROOT / TEACHER, export_dir)


def warm_start(args, ode_cfg, dmd2_cfg, out: Path, pairs: int, steps: int) -> Path:
    """ODE pairs, then ODE-init of the student; returns the exported student (Wan native folder)."""
    data = ode_pairs(ode_cfg, dmd2_cfg, out, pairs, args.teacher_steps, args.seed, args.threads,
                     stream="bidirectional-ode-pairs")
    return warm_start_student(args.warm_start, args.set_warm_start, data, out / "warm_start", out / "warm_student",
                              steps, args.threads, "ODE-init warm start")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--causal" in argv:  # the block-autoregressive path: ODE-init, self-forcing, 1x and 2x length
        import bench_quality_causal

        argv.remove("--causal")
        return bench_quality_causal.main(argv)
    args = parse_args(argv)
    start = time.perf_counter()
    mode = QUICK if args.quick else FULL
    max_steps = args.max_steps or mode["max_steps"]
    samples = args.samples or mode["samples"]
    pairs = args.pairs or mode["pairs"]
    warm_start_steps = args.warm_start_steps or mode["warm_start_steps"]
    if args.threads:
        torch.set_num_threads(args.threads)
    from megadistill.config import ConfigError, load_config
    from megadistill.eval.quality import fd_inf_min_samples, world_of
    from megadistill.train.quality_report import dmd2_quality_report, quality_bar

    try:
        cfg = load_config(args.config, args.overrides)
        ode_cfg = None
        if args.warm_start != "none":
            if pairs < 1 or warm_start_steps < 1:
                raise ValueError(f"--pairs {pairs} and --warm_start_steps {warm_start_steps} must be >= 1")
            ode_cfg = load_config(args.warm_start, ["data.path=."] + args.set_warm_start)
            check_same_step_list(ode_cfg, cfg, args.warm_start)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        out = Path(args.output_dir or tmp).resolve()
        out.mkdir(parents=True, exist_ok=True)
        overrides = list(args.overrides)
        if ode_cfg is not None:
            init = warm_start(args, ode_cfg, cfg, out, pairs, warm_start_steps)
            overrides = [f"models.student.path={init}"] + overrides
            cfg = load_config(args.config, overrides)
        checkpoint = train(args.config, overrides, out / "dmd2", max_steps, args.threads, "DMD2 training")
        with_fd_inf = samples >= fd_inf_min_samples(world_of(cfg))
        result = dmd2_quality_report(cfg, checkpoint, samples, args.teacher_steps, args.batch_size, args.seed,
                                     fd_inf=with_fd_inf)
    fd_inf = result.pop("fd_inf", None)
    result["wall_s"] = time.perf_counter() - start
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.json:
        write_json_atomic(args.json, text + "\n")
    bar = quality_bar(result)
    for name, ok in bar.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}", file=sys.stderr)
    if fd_inf is not None:
        print("FD_inf (FD extrapolated to infinitely many clips): "
              + ", ".join(f"{k} {v:.2f}" for k, v in fd_inf.items()), file=sys.stderr)
        for name, ok in quality_bar(result, fd_inf).items():
            print(f"{'PASS' if ok else 'FAIL'}  {name} (on FD_inf)", file=sys.stderr)
    return 1 if args.check and not all(bar.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
