"""Benchmark the attention backends at Wan shapes: time and TFLOP/s, forward and forward+backward.

    python tools/bench_attention.py [--json OUT] [--quick]

Cases (bf16, head dim 128, batch 1), for Wan 1.3B (12 heads) and 14B (40 heads):
  full          S = 32760 bidirectional; baseline torch SDPA with the flash backend
  block_causal  S = 32760, 4680-token frame blocks; baseline SDPA with an explicit boolean mask
  kv_cache      a 4680-token block of queries against Sk = 9360 / 18720 / 32760 cached keys (it
                sees all of them); baseline SDPA flash (no mask needed)

FLOPs: forward = 4 * D * (visible query/key pairs) per head (two matmuls), backward = 2.5x forward
(five matmuls), so forward+backward = 3.5x forward. "effective" TFLOP/s counts only the pairs the
mask lets attend, for every backend alike; dense TFLOP/s (all Sq x Sk pairs) is reported next to it.
Backends run interleaved (one call each, round robin) and each reports the median of its times.
Peak: H100 SXM dense bf16 989 TFLOP/s. Goals: full >= 1.0x SDPA and >= 50% of peak forward;
block-causal >= 1.6x SDPA with an explicit mask.

Without CUDA it exits with status 2, unless --quick asks for a tiny CPU smoke run (numbers there
only show that the harness works).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadistill.kernels import attention, build_mask, visible_pairs  # noqa: E402

H100_BF16_PEAK_TFLOPS = 989.0
MODELS = {"wan1.3b": 12, "wan14b": 40}
FRAME_BLOCK = 4680
CLIP = 32760


def cases(quick):
    models = {"wan1.3b": 12} if quick else MODELS
    for model, heads in models.items():
        yield dict(model=model, case="full", heads=heads, sq=CLIP, sk=CLIP, mask={})
        yield dict(model=model, case="block_causal", heads=heads, sq=CLIP, sk=CLIP,
                   mask=dict(block_causal_tokens=FRAME_BLOCK))
        for sk in ((CLIP,) if quick else (2 * FRAME_BLOCK, 4 * FRAME_BLOCK, CLIP)):
            yield dict(model=model, case=f"kv_cache_{sk}", heads=heads, sq=FRAME_BLOCK, sk=sk,
                       mask=dict(block_causal_tokens=FRAME_BLOCK, q_offset=sk - FRAME_BLOCK))


def backends(case, q, k):
    """name -> callable(q, k, v). Ours through the dispatcher; SDPA the way a user would call it."""
    mask = case["mask"]
    fns = {"triton": lambda q, k, v: attention(q, k, v, backend="triton", **mask)}
    if case["case"] == "block_causal":
        dense = build_mask(q.shape[1], k.shape[1], device=q.device, **mask)
        fns["sdpa_explicit_mask"] = lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dense).transpose(1, 2)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        fns["sdpa_flash"] = flash
    return fns


def cuda_timer(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def cpu_timer(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_case(case, *, device, dtype, reps, warmup, backend_fns=None):
    B, H, D = 1, case["heads"], 128 if device == "cuda" else 64
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, s, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
               for s in (case["sq"], case["sk"], case["sk"]))
    do = torch.randn_like(q)
    fns = backend_fns(case, q, k) if backend_fns else backends(case, q, k)
    pairs = visible_pairs(case["sq"], case["sk"], **case["mask"])
    fwd_flops = 4 * B * H * D * pairs
    dense_flops = 4 * B * H * D * case["sq"] * case["sk"]
    timer = cuda_timer if device == "cuda" else cpu_timer
    result = dict(model=case["model"], case=case["case"], heads=H, head_dim=D, sq=case["sq"],
                  sk=case["sk"], mask={k_: v_ for k_, v_ in case["mask"].items()},
                  visible_fraction=pairs / (case["sq"] * case["sk"]), modes={})
    for mode, mult in (("fwd", 1.0), ("fwd_bwd", 3.5)):
        def step(fn):
            if mode == "fwd":
                with torch.no_grad():
                    fn(q, k, v)
            else:
                torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        times, errors = {name: [] for name in fns}, {}
        for name, fn in fns.items():
            try:
                for _ in range(warmup):
                    step(fn)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # e.g. OOM of a mask path
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        live = [n for n in fns if n not in errors]
        for _ in range(reps):  # interleaved: one call of each backend per round
            for name in live:
                times[name].append(timer(lambda: step(fns[name])))
        per = {}
        for name in fns:
            if name in errors:
                per[name] = dict(error=errors[name])
                continue
            t = statistics.median(times[name])
            eff = mult * fwd_flops / t / 1e12
            per[name] = dict(ms=t * 1e3, tflops_effective=eff,
                             tflops_dense=mult * dense_flops / t / 1e12)
            if device == "cuda":
                per[name]["pct_of_h100_peak"] = 100 * eff / H100_BF16_PEAK_TFLOPS
        base = next((n for n in per if n != "triton" and "ms" in per[n]), None)
        if "ms" in per.get("triton", {}) and base:
            per["speedup_vs_" + base] = per[base]["ms"] / per["triton"]["ms"]
        result["modes"][mode] = per
    return result


def goals(results):
    """The targets, checked on what was measured (None where a figure is missing)."""
    out = {}
    for r in results:
        fwd = r["modes"]["fwd"]
        if r["case"] == "full":
            sp = fwd.get("speedup_vs_sdpa_flash")
            pct = fwd.get("triton", {}).get("pct_of_h100_peak")
            out[f"{r['model']}/full: fwd >= 1.0x sdpa_flash"] = None if sp is None else sp >= 1.0
            out[f"{r['model']}/full: fwd >= 50% of peak"] = None if pct is None else pct >= 50
        if r["case"] == "block_causal":
            sp = fwd.get("speedup_vs_sdpa_explicit_mask")
            out[f"{r['model']}/block_causal: fwd >= 1.6x sdpa_explicit_mask"] = (
                None if sp is None else sp >= 1.6)
    return out


def write_json(path, payload):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench_attention.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def cpu_smoke_backends(case, q, k):
    mask = case["mask"]
    return {name: (lambda q, k, v, name=name: attention(q, k, v, backend=name, **mask))
            for name in ("sdpa", "reference")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--quick", action="store_true",
                   help="1.3B shapes only and fewer repeats on GPU; a tiny smoke run on CPU")
    p.add_argument("--reps", type=int, default=None, help="timed calls per backend (median)")
    args = p.parse_args(argv)

    if torch.cuda.is_available():
        reps = args.reps or (5 if args.quick else 20)
        results = [run_case(c, device="cuda", dtype=torch.bfloat16, reps=reps, warmup=2)
                   for c in cases(args.quick)]
        payload = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       dtype="bfloat16", flops_reported="effective (visible pairs only); "
                       "dense alongside", peak_tflops=H100_BF16_PEAK_TFLOPS, reps=reps,
                       results=results, goals=goals(results))
    elif args.quick:
        smoke = [dict(model="smoke", case="full", heads=2, sq=256, sk=256, mask={}),
                 dict(model="smoke", case="block_causal", heads=2, sq=256, sk=256,
                      mask=dict(block_causal_tokens=64))]
        results = [run_case(c, device="cpu", dtype=torch.float32, reps=args.reps or 3, warmup=1,
                            backend_fns=cpu_smoke_backends) for c in smoke]
        payload = dict(device="cpu", smoke=True, note="no CUDA: tiny CPU smoke of the harness with "
                       "the sdpa and reference backends; not a performance figure", results=results)
    else:
        print("bench_attention: no CUDA device found. The figures need a GPU (H100 for the peak "
              "comparison); run `python tools/bench_attention.py --quick` for a CPU smoke run.",
              file=sys.stderr)
        return 2
    text = json.dumps(payload, indent=2)
    print(text)
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
