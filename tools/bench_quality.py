#!/usr/bin/env python
"""Distill the shipped tiny teacher into a 4-step DMD2 student and measure both.

    python tools/bench_quality.py --quick                  # the README's main job, CPU, < 15 min
    python tools/bench_quality.py --json quality.json      # longer run, 512 clips per set

1. trains ``configs/tiny_dmd2_quality.yaml`` (student and critic initialised from the teacher in
   ``configs/weights/tiny_teacher``) with ``launch/pretrain_dmd.py`` in a subprocess: the same
   launcher, builder, method and trainer as any real run;
2. samples, on the same captions and starting noise:
   * ``teacher_50``: the teacher, 50 uniform steps of the shifted schedule, Euler ODE, with the
     guidance the DMD2 run uses for its real score (``method_config.guidance_scale`` under
     ``method_config.guidance_convention``);
   * ``teacher_4``: the teacher, Euler ODE with the same guidance on the student's 4-step list;
   * ``student_4``: the distilled student, DMD few-step sampling on its step list (predict x0,
     re-noise to the next step), no guidance;
   and real clips of the same captions (``real``);
3. prints one JSON object to stdout::

     {"real": {"fd", "adherence", "temporal_error"}, "teacher_50": {...}, "teacher_4": {...},
      "student_4": {...}, "noise_floor_fd": x, "wall_s": x}

   FDs are measured against an independent real set of the same size; ``noise_floor_fd`` is the
   FD of two real sets of that size. Training logs and the quality bar verdict go to stderr;
   ``--check`` makes the exit status 1 when the bar (docs/QUALITY.md) is missed.
"""
import argparse
import codecs
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch

from megadistill.checkpoint import write_json_atomic

ROOT = Path(_bootstrap.ROOT)
DEFAULT_CONFIG = "configs/tiny_dmd2_quality.yaml"
QUICK = {"max_steps": 2000, "samples": 256}
FULL = {"max_steps": 3000, "samples": 512}


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


def distill(config: str, overrides, output_dir: str, max_steps: int, threads) -> Path:
    """Run the DMD2 launcher in a subprocess; returns the final checkpoint folder."""
    from megadistill.train.checkpoint import latest_checkpoint

    cmd = [sys.executable, str(ROOT / "launch" / "pretrain_dmd.py"), "--config", config,
           "--output_dir", output_dir, "--max_steps", str(max_steps), "--checkpoint_every", "0"]
    for o in overrides:
        cmd += ["--set", o]
    run_logged(cmd, threads, "DMD2 training")
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        raise SystemExit(f"DMD2 training wrote no checkpoint under {output_dir}")
    return ckpt


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
    if args.threads:
        torch.set_num_threads(args.threads)
    from megadistill.config import ConfigError, load_config
    from megadistill.train.quality_report import dmd2_quality_report, quality_bar

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        out = args.output_dir or tmp
        checkpoint = distill(args.config, args.overrides, out, max_steps, args.threads)
        result = dmd2_quality_report(cfg, checkpoint, samples, args.teacher_steps, args.batch_size, args.seed)
    result["wall_s"] = time.perf_counter() - start
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.json:
        write_json_atomic(args.json, text + "\n")
    bar = quality_bar(result)
    for name, ok in bar.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}", file=sys.stderr)
    return 1 if args.check and not all(bar.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
