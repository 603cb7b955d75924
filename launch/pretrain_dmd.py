#!/usr/bin/env python
"""Train a few-step (or block-autoregressive) student from a Wan teacher.

    deepspeed launch/pretrain_dmd.py --ds_config configs/ds/zero3_cpu.json --config configs/tiny_dmd2.yaml

Runs the same on one CPU box (gloo) and on multinode GPU jobs (NCCL): the launcher sets the
ranks, the config sets the method, models and parallel layout, the DeepSpeed config sets ZeRO.
Without a launcher (``python launch/pretrain_dmd.py ...``) it runs as a single process.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadistill.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config (YAML, schema v2)")
    ap.add_argument("--ds_config", default=None, help="DeepSpeed JSON config (ZeRO stage, precision); "
                    "without it roles are plain modules with torch AdamW")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set training.lr=1e-5 (repeatable)")
    ap.add_argument("--output_dir", default=None, help="overrides logging.output_dir")
    ap.add_argument("--max_steps", type=int, default=None, help="overrides training.max_steps")
    ap.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in output_dir) or a path")
    ap.add_argument("--checkpoint_every", type=int, default=None, help="overrides checkpoint.every")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


def load_ds_config(path):
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(path, None, "DeepSpeed config file not found (--ds_config)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(path, None, f"invalid JSON: {e}") from None


def main(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"logging.output_dir={args.output_dir}")
    if args.max_steps:
        overrides.append(f"training.max_steps={args.max_steps}")
    try:
        # Every config problem is reported here, before any process group or model exists.
        cfg = load_config(args.config, overrides)
        ds_config = load_ds_config(args.ds_config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from megadistill.train.builder import build_run
    from megadistill.train.trainer import Trainer

    try:
        run = build_run(cfg, ds_config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    trainer = Trainer(run, cfg.logging.output_dir, checkpoint_every=args.checkpoint_every,
                      resume=args.resume)
    trainer.fit()
    import torch.distributed as dist

    from megadistill import distributed as grid

    rank = dist.get_rank() if dist.is_initialized() else 0
    student = None
    if cfg.logging.quality_samples:  # collective: ZeRO-3 partitions are gathered from every rank
        from megadistill.train.quality_report import student_full_state

        student = student_full_state(run.bundle["student"])
    grid.destroy()
    if student is not None and rank == 0:
        print_quality_report(cfg, student)
    return 0


def print_quality_report(cfg, student) -> None:
    """Sample the teacher and the trained ``student`` (its full state dict: the EMA weights when
    the run keeps them) and print the quality report (docs/QUALITY.md) as one JSON line; also
    written to ``<output_dir>/quality.json``."""
    import time

    from megadistill.checkpoint import write_json_atomic
    from megadistill.train.quality_report import dmd2_quality_report

    start = time.perf_counter()
    n = cfg.logging.quality_samples
    print(f"quality report: sampling {n} clips per set (teacher 50 and 4 steps, student) ...", flush=True)
    report = dmd2_quality_report(cfg, student, n)
    report["wall_s"] = time.perf_counter() - start
    text = json.dumps(report)
    write_json_atomic(os.path.join(cfg.logging.output_dir, "quality.json"), text + "\n")
    print(f"quality report ({n} clips per set; docs/QUALITY.md): {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
