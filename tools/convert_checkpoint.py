#!/usr/bin/env python
"""Convert a Wan DiT checkpoint between Wan native, diffusers and megadistill (tp/pp sharded) formats.

    python tools/convert_checkpoint.py --src Wan2.1-T2V-1.3B --dst ckpt/student --to megadistill --tp 2 --pp 2

The source format is detected from the key names. Streaming: memory holds about one tensor at a
time. The destination folder is written under a temp name and renamed when complete. Bad input
prints one ``error:`` line and exits with status 2, leaving nothing behind.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megadistill.checkpoint import CheckpointError  # noqa: E402
from megadistill.models.wan.checkpoint import FORMATS, convert_wan_checkpoint  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="checkpoint file or folder (any format)")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (megadistill output)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (megadistill output)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast tensors (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", help="largest file of native/diffusers output (default 5GB)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, when the source has no config.json (default dim // 128)")
    p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        s = convert_wan_checkpoint(a.src, a.dst, a.to, tp=a.tp, pp=a.pp, dtype=a.dtype, overwrite=a.overwrite,
                                   max_shard_size=a.max_shard_size, num_heads=a.num_heads,
                                   progress=not a.no_progress)
    except (CheckpointError, OSError) as e:  # bad input, existing destination, unwritable folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    layout = f" tp={s['tp']} pp={s['pp']}" if s["format"] == "megadistill" else ""
    print(f"converted {s['src_format']} -> {s['format']}{layout}: {s['tensors']} tensors, "
          f"{s['bytes'] / 1e9:.3f} GB {s['dtype']}, {len(s['files'])} files, {s['seconds']:.1f} s "
          f"(config from {s['config_source']}) -> {s['dst']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
