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
    from megadistill import distributed as grid

    grid.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
