"""Bytes each rank moves in one training step (forward + backward + optimizer step) of a tiny Wan DiT
under a parallel layout, measured on gloo processes, against the analytic minimum of the layout.

    python tools/bench_comm.py --layouts tp2,sp2,tp2xsp2,dp2xsp2 --json

A layout is ``x``-joined axis sizes (``tp2``, ``sp2``, ``dp2xsp2``, ``tp2xsp2``); the world is their
product. tp and sp come from megadistill.models.wan.parallel (counted by
megadistill.distributed.count_collectives); when dp x sp > 1 the model is a DeepSpeed ZeRO-3 engine over
the dp x sp group, whose collectives are counted by DeepSpeed's comms logger. The loss of a rank
is the mean over its own tokens (the trainer's convention under Ulysses).

Bytes moved per rank are what a ring / pairwise algorithm sends from one rank, for a group of N:
    all-gather  (N-1)/N x gathered size      reduce-scatter  (N-1)/N x input size
    all-reduce  2 (N-1)/N x tensor size      all-to-all      (N-1)/N x local tensor size

Analytic minimum per step and rank (L blocks, n local tokens, T text tokens, C = dim, b bytes):
    Ulysses   4 all-to-alls per self-attention forward (q, k, v, out) and 4 backward, each of
              n x C / tp elements: 8 L n C/tp b (N-1)/N
    TP        Megatron with fused projections: per block 3 all-reduces forward (after o, cross o,
              FFN-out) and 3 backward (before the fused qkv, cross q, FFN-in) of n x C, 1 backward
              for the fused cross k/v over the text (T x C), and the q/k RMSNorm sums (n or T
              floats, forward and backward): 2 (N-1)/N b [6 n C + T C] L + 2 (N-1)/N 4 [6 n + 2 T] L
    ZeRO-3    all-gathers of the parameters in the forward and again in the backward, one
              reduce-scatter of the gradients, over the N = dp x sp ranks: 3 (N-1)/N P_local b
The ratio measured / minimum shows what the implementation adds (e.g. separate q, k and v
column layers each all-reduce their input gradient under tp).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile

import _bootstrap  # noqa: F401

import torch  # noqa: E402

GRID = (2, 8, 12)       # latents: 2 frames of 8 x 12 -> 48 tokens with patch (1, 2, 2)
TEXT = 32
LAYERS = 2


def parse_layout(spec: str) -> dict:
    sizes = {"tp": 1, "sp": 1, "dp": 1}
    for part in spec.split("x"):
        m = re.fullmatch(r"(tp|sp|dp)(\d+)", part.strip())
        if not m:
            raise ValueError(f"layout {spec!r}: write axis sizes joined by x, e.g. tp2xsp2 or dp2xsp2")
        sizes[m.group(1)] = int(m.group(2))
    return sizes


def moved(kind: str, nbytes: float, n: int) -> float:
    """Bytes one rank sends for a collective over ``n`` ranks (see the module docstring); ``nbytes``
    is the full tensor (all-gather output, reduce-scatter / all-reduce input, all-to-all local input)."""
    if n <= 1:
        return 0.0
    f = (n - 1) / n
    return 2 * f * nbytes if kind == "all_reduce" else f * nbytes


def analytic_minimum(cfg, layout: dict, tokens: int | None = None, text_len: int = TEXT, dtype_bytes: int = 4,
                     forward_only: bool = False) -> dict:
    """Minimum bytes moved per rank, per group, by one forward + backward (or one forward with
    ``forward_only``) of ``tokens`` video tokens (default: the measured tiny case); see the module
    docstring."""
    tp, sp, dp = layout["tp"], layout["sp"], layout["dp"]
    if tokens is None:
        tokens = GRID[0] * (GRID[1] // 2) * (GRID[2] // 2)
    n = -(-tokens // sp)
    c, L, b, t = cfg.dim, cfg.num_layers, dtype_bytes, text_len
    passes = 1 if forward_only else 2
    out = {}
    if sp > 1:
        out["sp"] = moved("all_to_all", 4 * passes * L * n * (c // tp) * b, sp)
    if tp > 1:
        act = 3 * n * c if forward_only else 6 * n * c + t * c
        out["tp"] = (moved("all_reduce", act * L * b, tp)
                     + moved("all_reduce", passes * (3 * n + t) * L * 4, tp))
    if dp * sp > 1:
        from megadistill.train.memory import local_parameter_numels

        p_local = sum(x for _, x in local_parameter_numels(cfg, tp)) * b
        out["dp_sp"] = (1 if forward_only else 3) * moved("all_gather", p_local, dp * sp)
    return out


def analytic_table(preset: str, layouts, tokens: int, text_len: int, dtype_bytes: int, forward_only: bool) -> list:
    """Analytic minimum per layout for a named Wan shape (no processes run)."""
    from megadistill.models.wan.config import get_preset

    cfg = get_preset(preset)
    rows = []
    for spec in layouts:
        layout = parse_layout(spec)
        if cfg.num_heads % (layout["tp"] * layout["sp"]):
            raise ValueError(f"layout {spec}: tp*sp must divide {preset}'s {cfg.num_heads} heads")
        groups = analytic_minimum(cfg, layout, tokens, text_len, dtype_bytes, forward_only)
        rows.append({"layout": spec, "preset": preset, "tokens": tokens, "text_len": text_len,
                     "dtype_bytes": dtype_bytes, "forward_only": forward_only,
                     "analytic_min_bytes": groups, "total": sum(groups.values())})
    return rows


# --- the measuring processes -----------------------------------------------------------------------

TINY = {"preset": "tiny", "layers": LAYERS, "latent": GRID, "text_len": TEXT, "dtype": "fp32", "steps": 0,
        "device": "cpu"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _step(model, engine, tokens, t, text, grid):
    if engine is not None:
        engine.backward(engine(tokens, t, text, grid=grid).float().square().mean())
        engine.step()
    else:
        model(tokens, t, text, grid=grid).float().square().mean().backward()
        model.zero_grad(set_to_none=True)


def _groups_moved(counts, ds_comm, sizes, zero_group):
    groups = {}
    for key, v in counts.as_dict().items():
        kind, group = key.split("/")
        n = sizes.get(group, 1)
        full = v["bytes"] * n if kind == "all_gather" else v["bytes"]  # counted: the local input (a shard)
        entry = groups.setdefault(group, {"calls": 0, "bytes_moved": 0.0, "by_kind": {}})
        entry["calls"] += v["calls"]
        entry["bytes_moved"] += moved(kind, full, n)
        entry["by_kind"][kind] = {"calls": v["calls"], "bytes_moved": moved(kind, full, n)}
    if ds_comm is not None:
        entry = groups.setdefault("dp_sp", {"calls": 0, "bytes_moved": 0.0, "by_kind": {}})
        for kind, per_size in ds_comm.comms_logger.comms_dict.items():
            # comms_dict: kind -> {message bytes: [count, latencies, algbw, busbw]}; the message size
            # is the tensor argument: the local shard of an all-gather, the whole input of a
            # reduce-scatter / all-reduce
            calls = sum(stats[0] for stats in per_size.values())
            nbytes = sum(size * stats[0] for size, stats in per_size.items())
            if kind.startswith("all_gather"):
                nbytes *= zero_group
            entry["calls"] += calls
            entry["bytes_moved"] += moved(kind, nbytes, zero_group)
            entry["by_kind"][kind] = {"calls": calls, "bytes_moved": moved(kind, nbytes, zero_group)}
    return groups


def _worker(rank, world, layout, out_dir, opts):
    import time

    import megadistill.distributed as md
    from megadistill.distributed import count_collectives
    from megadistill.models.wan.config import get_preset
    from megadistill.models.wan.dit import WanDiT, init_weights
    from megadistill.models.wan.parallel import local_chunk, parallelize_wan, patchify

    cuda = opts["device"] == "cuda"
    backend = "nccl" if cuda else "gloo"
    md.initialize(tp=layout["tp"], sp=layout["sp"], backend=backend)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = _DTYPES[opts["dtype"]]
    cfg = get_preset(opts["preset"]).replace(num_layers=opts["layers"], text_len=opts["text_len"])
    model = init_weights(WanDiT(cfg), seed=0).to(device=device, dtype=dtype)
    parallelize_wan(model, md.get_tp_group(), md.get_sp_group())
    g = torch.Generator().manual_seed(1)
    f, h, w = opts["latent"]
    latents = torch.randn(1, cfg.in_dim, f, h, w, generator=g).to(device=device, dtype=dtype)
    text = torch.randn(1, opts["text_len"], cfg.text_dim, generator=g).to(device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    grid = (f // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
    tokens = local_chunk(patchify(latents, cfg.patch_size), md.get_sp_group())
    zero_group = md.get_dp_sp_size()
    engine, ds_comm = None, None
    if zero_group > 1:
        import deepspeed
        import deepspeed.comm as ds_comm

        from megadistill.distributed.deepspeed_comm import init_deepspeed_comm
        init_deepspeed_comm(backend)
        for module in (model.time_embedding, model.time_projection):  # read by embed_time, not called
            for p in module.parameters():
                deepspeed.zero.register_external_parameter(model, p)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "bf16": {"enabled": opts["dtype"] == "bf16"},
                  "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                          config=config, mpu=md.mpu)
        ds_comm.comms_logger.comms_dict.clear()
    with count_collectives() as counts:
        _step(model, engine, tokens, t, text, grid)
    result = {"groups": _groups_moved(counts, ds_comm, {"tp": layout["tp"], "sp": layout["sp"], "dp_sp": zero_group},
                                      zero_group)}
    if engine is not None:
        ds_comm.configure(enabled=False)
    times = []
    for _ in range(opts["steps"]):  # timed steps after the counted (warm-up) one
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        _step(model, engine, tokens, t, text, grid)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    result["step_seconds"] = sorted(times)[len(times) // 2] if times else None
    if engine is not None:
        engine.destroy()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


def _entry(rank, world, port, layout, out_dir, opts):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    os.dup2(2, 1)  # library logs of the workers go to stderr; stdout carries only the report
    import megadistill.distributed as md
    try:
        _worker(rank, world, layout, out_dir, opts)
    finally:
        md.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(spec: str, opts: dict | None = None) -> dict:
    """Run one step of the layout ``spec`` (plus ``opts["steps"]`` timed ones) and return the bytes
    moved per group by rank 0, the analytic minimum, their ratio and the median step time."""
    import torch.multiprocessing as mp

    from megadistill.models.wan.config import get_preset

    opts = {**TINY, **(opts or {})}
    layout = parse_layout(spec)
    world = layout["tp"] * layout["sp"] * layout["dp"]
    cfg = get_preset(opts["preset"]).replace(num_layers=opts["layers"])
    if cfg.num_heads % (layout["tp"] * layout["sp"]):
        raise ValueError(f"layout {spec}: tp*sp must divide the model's {cfg.num_heads} heads")
    if opts["device"] == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"layout {spec} needs {world} GPUs, {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world, _free_port(), layout, out_dir, opts), nprocs=world, join=True,
                           start_method="spawn" if torch.cuda.is_initialized() else "fork")
        ranks = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as fh:
                ranks.append(json.load(fh))
    f, h, w = opts["latent"]
    n_tokens = (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    minimum = analytic_minimum(cfg, layout, n_tokens, opts["text_len"], _DTYPES[opts["dtype"]].itemsize)
    groups = ranks[0]["groups"]
    result = {"layout": spec, "world": world, **{k: layout[k] for k in ("tp", "sp", "dp")},
              "model": {"preset": opts["preset"], "num_layers": opts["layers"], "dim": cfg.dim, "tokens": n_tokens,
                        "text_len": opts["text_len"], "dtype": opts["dtype"], "device": opts["device"]},
              "groups": {}}
    for group in sorted(set(groups) | set(minimum)):
        got = groups.get(group, {"calls": 0, "bytes_moved": 0.0, "by_kind": {}})
        low = minimum.get(group)
        result["groups"][group] = {**got, "analytic_min_bytes": low,
                                   "ratio": (got["bytes_moved"] / low) if low else None}
    result["total_bytes_moved"] = sum(g["bytes_moved"] for g in groups.values())
    result["total_analytic_min_bytes"] = sum(minimum.values())
    result["ranks_agree"] = all(
        abs(r["groups"].get(k, {}).get("bytes_moved", 0) - v["bytes_moved"]) <= 1e-6 * max(1.0, v["bytes_moved"])
        for r in ranks for k, v in groups.items())
    steps = [r["step_seconds"] for r in ranks if r["step_seconds"] is not None]
    result["step_seconds"] = max(steps) if steps else None  # the slowest rank's median
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="tp2,sp2,tp2xsp2,dp2xsp2",
                    help="comma list of layouts, e.g. tp2,sp2,tp2xsp2,dp2xsp2")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--analytic", metavar="PRESET",
                    help="run nothing: print the analytic minimum for a Wan preset (e.g. wan2.1-t2v-14b) and "
                         "--tokens under each layout (layouts then name dp too: dp16xsp4)")
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--text-len", type=int, default=None,
                    help="text tokens (default: 512, or 32 when running the tiny preset)")
    ap.add_argument("--dtype-bytes", type=int, default=2)
    ap.add_argument("--forward-only", action="store_true", help="with --analytic: a forward without grad")
    ap.add_argument("--preset", default="tiny", help="model shape to run (default: tiny)")
    ap.add_argument("--layers", type=int, default=LAYERS, help="blocks of the preset to run")
    ap.add_argument("--latent", type=int, nargs=3, default=list(GRID), metavar=("F", "H", "W"),
                    help="latent frames, height, width (16 channels)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: one GPU per rank, NCCL (needs world GPUs)")
    ap.add_argument("--time-steps", type=int, default=0,
                    help="also time this many steps after the counted one (median of each rank, slowest rank)")
    args = ap.parse_args(argv)
    if args.analytic:
        try:
            rows = analytic_table(args.analytic, args.layouts.split(","), args.tokens, args.text_len or 512,
                                  args.dtype_bytes, args.forward_only)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        what = "forward" if args.forward_only else "forward + backward"
        print(f"{args.analytic}, {args.tokens} tokens, {args.dtype_bytes}-byte activations/parameters, one {what}; "
              f"GB (1e9) sent per rank")
        print(f"{'layout':<16}{'tp':>8}{'sp':>8}{'dp_sp':>8}{'total':>8}")
        for r in rows:
            g = r["analytic_min_bytes"]
            cells = "".join(f"{g.get(k, 0) / 1e9:>8.2f}" for k in ("tp", "sp", "dp_sp"))
            print(f"{r['layout']:<16}{cells}{r['total'] / 1e9:>8.2f}")
        return 0
    try:
        specs = [parse_layout(s) and s for s in args.layouts.split(",")]
        opts = {"preset": args.preset, "layers": args.layers, "latent": tuple(args.latent),
                "text_len": args.text_len or (TEXT if args.preset == "tiny" else 512), "dtype": args.dtype,
                "device": args.device, "steps": args.time_steps}
        results = [measure(s, opts) for s in specs]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'layout':<10}{'group':<7}{'calls':>7}{'KiB moved':>12}{'KiB minimum':>13}{'ratio':>7}")
    for r in results:
        for group, g in r["groups"].items():
            low = g["analytic_min_bytes"]
            print(f"{r['layout']:<10}{group:<7}{g['calls']:>7}{g['bytes_moved'] / 1024:>12.1f}"
                  f"{(low or 0) / 1024:>13.1f}{(g['ratio'] or float('nan')):>7.2f}")
        if r["step_seconds"] is not None:
            print(f"{r['layout']:<10}step time {r['step_seconds'] * 1e3:.2f} ms (median, slowest rank)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
