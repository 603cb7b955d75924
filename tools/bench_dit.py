#!/usr/bin/env python
"""Forward+backward time of megadistill's WanDiT vs diffusers' WanTransformer3DModel.

Same config, same weights, same inputs, same process; runs interleaved (ours, theirs, ours, ...)
so that machine noise hits both alike; reports medians and ``ratio`` = ours / diffusers.

    python tools/bench_dit.py --preset wan2.1-t2v-1.3b --layers 2 --latent 1 16 3 16 16 --json out.json
"""
import argparse
import json
import platform
import statistics
import sys
import time

import _bootstrap  # noqa: F401
import torch
import torch.nn.functional as F


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--layers", type=int, default=2, help="number of DiT blocks (a slice of the preset)")
    ap.add_argument("--latent", type=int, nargs=5, default=[1, 16, 3, 16, 16], metavar=("B", "C", "F", "H", "W"))
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per model (median reported; >= 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--json", default=None, help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import WanTransformer3DModel

    from megadistill.models.wan import WanDiT, get_preset, init_weights
    from megadistill.models.wan.keys import native_to_diffusers

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    dev = torch.device(args.device)
    cfg = get_preset(args.preset).replace(num_layers=args.layers)
    ours = init_weights(WanDiT(cfg), seed=0).to(dev, dtype)
    theirs = WanTransformer3DModel(**cfg.diffusers_init_kwargs())
    theirs.load_state_dict({native_to_diffusers(k): v for k, v in ours.state_dict().items()})
    theirs = theirs.to(dev, dtype)

    g = torch.Generator().manual_seed(0)
    b = args.latent[0]
    x = torch.randn(*args.latent, generator=g).to(dev, dtype)
    t = (torch.rand(b, generator=g) * 1000).to(dev)
    text = torch.randn(b, args.text_tokens, cfg.text_dim, generator=g).to(dev, dtype)
    text_padded = F.pad(text, (0, 0, 0, cfg.text_len - args.text_tokens))

    def step_ours():
        ours(x, t, text).float().square().mean().backward()

    def step_theirs():
        theirs(x, t, text_padded, return_dict=False)[0].float().square().mean().backward()

    def timed(fn, model):
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        timed(step_ours, ours)
        timed(step_theirs, theirs)
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):
        ours_t.append(timed(step_ours, ours))
        theirs_t.append(timed(step_theirs, theirs))
    mo, mt = statistics.median(ours_t), statistics.median(theirs_t)
    tokens = (args.latent[2] // cfg.patch_size[0]) * (args.latent[3] // cfg.patch_size[1]) * (
        args.latent[4] // cfg.patch_size[2])
    result = {
        "benchmark": "dit_forward_backward",
        "preset": args.preset, "layers": args.layers, "latent": args.latent, "tokens": tokens,
        "text_tokens": args.text_tokens, "dtype": args.dtype, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "ours_s": mo, "diffusers_s": mt, "ratio": mo / mt,
        "ours_all_s": ours_t, "diffusers_all_s": theirs_t,
        "torch": torch.__version__,
    }
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text_out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
