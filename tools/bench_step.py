#!/usr/bin/env python
"""Training throughput of a recipe through the real entry point: steps/s and samples/s with 1 and
2 ranks (CPU: gloo + ZeRO-3), measured from the trainer's per-step log, first steps excluded.

    python tools/bench_step.py --config configs/tiny_dmd2.yaml --steps 30 --json out.json

On a GPU machine pass --ranks 1 8 and --ds_config configs/ds/zero3_gpu_bf16.json.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import _bootstrap  # noqa: F401

ROOT = _bootstrap.ROOT


def run(config, ds_config, ranks, steps, overrides, out):
    common = ["--config", config, "--max_steps", str(steps), "--output_dir", out, "--checkpoint_every", "0",
              "--set", "logging.log_every=1", "--set", "logging.tensorboard=false", *sum((["--set", o] for o in overrides), [])]
    launch = os.path.join(ROOT, "launch", "pretrain_dmd.py")
    if ranks == 1 and ds_config is None:
        cmd = [sys.executable, launch, *common]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
               launch, *common] + (["--ds_config", ds_config] if ds_config else [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"run with {ranks} rank(s) failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_dmd2.yaml"))
    ap.add_argument("--ds_config", default=os.path.join(ROOT, "configs", "ds", "zero3_cpu.json"),
                    help="DeepSpeed config for the multi-rank runs ('none' for plain data parallel-free runs)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="first steps excluded (warm-up)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ds = None if args.ds_config == "none" else args.ds_config
    results = {}
    for ranks in args.ranks:
        with tempfile.TemporaryDirectory() as out:
            log = run(args.config, ds if ranks > 1 else None, ranks, args.steps, args.overrides, out)
        times = [r["step_time_s"] for r in log[args.skip:]]
        per_rank_batch = log[-1]["samples_per_s"] * log[-1]["step_time_s"]
        med = statistics.median(times)
        results[f"{ranks}_rank"] = {"ranks": ranks, "median_step_s": med, "steps_per_s": 1.0 / med,
                                    "samples_per_s": per_rank_batch / med, "steps_measured": len(times)}
    out = {"benchmark": "train_step", "config": os.path.relpath(args.config, ROOT), "results": results,
           "machine": platform.machine(), "cpus": os.cpu_count()}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
