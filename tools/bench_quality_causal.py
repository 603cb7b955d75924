#!/usr/bin/env python
"""Causal quality benchmark: ODE-init then self-forcing of a block-causal student from the shipped
tiny teacher, sampled block by block at the training length F and at 2F.

    python tools/bench_quality_causal.py --quick --json causal.json      # CPU (times: docs/QUALITY.md)
    python tools/bench_quality_causal.py --bidirectional_json quality.json  # reuse a bench_quality run

1. writes teacher ODE trajectories (``tools/generate_ode_pairs.py``) of ``--pairs`` synthetic
   captions: the shipped teacher, 50 uniform Euler steps with the kept timesteps inserted, CFG as the
   bidirectional bench's ``teacher_50`` (the DMD2 quality config's ``guidance_scale`` /
   ``guidance_convention``);
2. ODE-inits a causal student from the teacher's weights (``configs/tiny_ode_init_quality.yaml``),
   exports it in Wan native format, then trains it with self-forcing DMD
   (``configs/tiny_self_forcing_quality.yaml``: teacher as real score, critic from the teacher);
   both through ``launch/pretrain_dmd.py``;
3. samples the self-forcing student (its EMA weights when the config keeps an EMA) block by block
   with its KV cache (``megadistill.eval.causal_quality``) at F
   (whole prefix) and at 2F (local window ``--window`` frames + ``--sinks`` sink frames), scored
   against the synthetic world of that length;
4. takes the bidirectional DMD2 student's FD from ``--bidirectional_json`` (a ``bench_quality.py``
   JSON of the same ``--samples`` and ``--seed``) or distils and samples it here as
   ``bench_quality.py`` does, with its step counts for the mode: an ODE-init warm start on this
   run's pairs (``--warm_start``, ``--dmd2_warm_start_steps`` steps), then ``--dmd2_steps`` DMD2
   steps;
5. prints one JSON object::

     {"causal_1x": {"fd", "adherence", "temporal_error"}, "causal_2x": {...},
      "bidirectional_student_fd": x, "noise_floor_fd": x,
      "bar": {"fd_ratio_1x", "temporal_ratio_2x", "met", ...}, "wall_s": x,
      "reference": {...}, "settings": {...}}

The bar (docs/QUALITY.md, "The causal student"): ``fd_1x <= 1.2 x bidirectional_student_fd`` and
``temporal_error_2x <= 1.5 x temporal_error_1x``. ``--check`` exits 1 when it is missed.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch
from bench_quality import FULL as BIDIRECTIONAL_FULL
from bench_quality import QUICK as BIDIRECTIONAL_QUICK
from bench_quality import WARM_START_CONFIG, check_same_step_list, ode_pairs, train, warm_start_student

from megadistill.checkpoint import write_json_atomic

ODE_CONFIG = "configs/tiny_ode_init_quality.yaml"
SF_CONFIG = "configs/tiny_self_forcing_quality.yaml"
DMD2_CONFIG = "configs/tiny_dmd2_quality.yaml"
# The bidirectional student trained here (no --bidirectional_json) is bench_quality.py's of the same mode.
QUICK = {"pairs": 1024, "ode_steps": 1000, "sf_steps": 1500, "samples": 256,
         "dmd2_steps": BIDIRECTIONAL_QUICK["max_steps"], "dmd2_warm_start_steps": BIDIRECTIONAL_QUICK["warm_start_steps"]}
FULL = {"pairs": 2048, "ode_steps": 2000, "sf_steps": 3000, "samples": 512,
        "dmd2_steps": BIDIRECTIONAL_FULL["max_steps"], "dmd2_warm_start_steps": BIDIRECTIONAL_FULL["warm_start_steps"]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"short mode {QUICK} (default {FULL})")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the JSON to this file")
    ap.add_argument("--pairs", type=int, default=None, help="ODE trajectories (captions) for ODE-init")
    ap.add_argument("--ode_steps", type=int, default=None, help="ODE-init training steps")
    ap.add_argument("--sf_steps", type=int, default=None, help="self-forcing DMD training steps")
    ap.add_argument("--dmd2_steps", type=int, default=None,
                    help="bidirectional DMD2 steps when --bidirectional_json is not given")
    ap.add_argument("--dmd2_warm_start_steps", type=int, default=None,
                    help="ODE-init steps of that student's warm start")
    ap.add_argument("--samples", type=int, default=None, help="clips per evaluated set")
    ap.add_argument("--bidirectional_json", default=None,
                    help="bench_quality.py JSON (same --samples and --seed) holding student_4's FD")
    ap.add_argument("--ode_config", default=ODE_CONFIG)
    ap.add_argument("--sf_config", default=SF_CONFIG)
    ap.add_argument("--dmd2_config", default=DMD2_CONFIG, help="bidirectional DMD2 config (also the CFG of the pairs)")
    ap.add_argument("--warm_start", default=WARM_START_CONFIG, metavar="CONFIG",
                    help="ODE-init config of the bidirectional student's warm start (on this run's pairs, "
                         "--ode_steps steps), or 'none'")
    ap.add_argument("--set_warm_start", action="append", default=[], metavar="KEY=VALUE",
                    help="override of the warm-start config")
    ap.add_argument("--set_ode", action="append", default=[], metavar="KEY=VALUE", help="override of the ODE-init config")
    ap.add_argument("--set_sf", action="append", default=[], metavar="KEY=VALUE",
                    help="override of the self-forcing config")
    ap.add_argument("--set_dmd2", action="append", default=[], metavar="KEY=VALUE", help="override of the DMD2 config")
    ap.add_argument("--window", type=int, default=6, help="2F sampling: attention window in latent frames")
    ap.add_argument("--sinks", type=int, default=3, help="2F sampling: attention-sink frames")
    ap.add_argument("--teacher_steps", type=int, default=50, help="uniform Euler steps of the ODE pairs")
    ap.add_argument("--batch_size", type=int, default=64, help="clips per sampling batch")
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (captions, noise)")
    ap.add_argument("--output_dir", default=None, help="work folder (default: a temporary folder, removed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every stage")
    ap.add_argument("--check", action="store_true", help="exit 1 when the bar is missed")
    return ap.parse_args(argv)


# -- measurement -------------------------------------------------------------------------------------------

def measure_causal(sf_config: str, sf_overrides, weights: Path, samples: int, window: int, sinks: int,
                   batch_size: int, seed: int) -> dict:
    """Rows ``causal_1x`` (whole prefix, F frames) and ``causal_2x`` (window + sinks, 2F frames)."""
    from megadistill.config import load_config
    from megadistill.eval.causal_quality import causal_row, world_of_length
    from megadistill.eval.quality import build_adapter, load_role_model, world_of
    from megadistill.train.quality_report import student_step_list

    rows = {}
    base = load_config(sf_config, sf_overrides)
    frames = base.pipeline_config.latent_shape[1]
    c, _, h, w = base.pipeline_config.latent_shape
    for name, length, extra in (("causal_1x", frames, ["pipeline_config.local_attn_size=-1",
                                                       "pipeline_config.sink_size=0"]),
                                ("causal_2x", 2 * frames, [f"pipeline_config.local_attn_size={window}",
                                                           f"pipeline_config.sink_size={sinks}",
                                                           f"pipeline_config.latent_shape=[{c},{2 * frames},{h},{w}]"])):
        cfg = load_config(sf_config, list(sf_overrides) + extra)
        student = load_role_model(cfg, "student", weights)
        adapter = build_adapter(cfg, {"student": student})
        timesteps = student_step_list(cfg, adapter.noise_scheduler)
        context = float(cfg.method_config.get("context_noise", 0.0)) * adapter.noise_scheduler.num_train_timesteps / 1000.0
        world = world_of_length(world_of(base), length)
        t0 = time.perf_counter()
        rows[name] = causal_row(student, adapter, world, timesteps, samples, seed, batch_size, context)
        rows[name]["sample_s"] = time.perf_counter() - t0
    return rows


def bidirectional_fd(args, out: Path, samples: int, steps: int, pairs: Path, warm_start_steps: int) -> dict:
    """``{"fd", "source"}`` of the bidirectional 4-step DMD2 student on the same evaluation set:
    read from ``--bidirectional_json``, or trained here as ``tools/bench_quality.py`` does (an ODE-init
    warm start, on this run's ODE pairs, unless ``--warm_start none``; then DMD2)."""
    if args.bidirectional_json:
        report = json.loads(Path(args.bidirectional_json).read_text())
        if "student_4" not in report or "fd" not in report["student_4"]:
            raise SystemExit(f"{args.bidirectional_json} has no student_4.fd: give a tools/bench_quality.py JSON")
        return {"fd": float(report["student_4"]["fd"]), "source": str(args.bidirectional_json)}
    from megadistill.config import load_config
    from megadistill.eval.quality import SamplingSpec, build_adapter, load_role_model, quality_report, world_of
    from megadistill.train.quality_report import student_step_list, student_weights

    overrides = list(args.set_dmd2)
    if args.warm_start != "none":
        init = warm_start_student(args.warm_start, args.set_warm_start, pairs, out / "dmd2_warm_start",
                                  out / "dmd2_warm_student", warm_start_steps, args.threads,
                                  "bidirectional ODE-init warm start")
        overrides = [f"models.student.path={init}"] + overrides
    cfg = load_config(args.dmd2_config, overrides)
    ckpt = train(args.dmd2_config, overrides, out / "dmd2", steps, args.threads, "bidirectional DMD2")
    student = load_role_model(cfg, "student", student_weights(ckpt))
    adapter = build_adapter(cfg, {"student": student})
    spec = SamplingSpec("student_4", student, student_step_list(cfg, adapter.noise_scheduler), "sde")
    report, _ = quality_report([spec], adapter, world_of(cfg), samples, args.seed, args.batch_size)
    return {"fd": report["student_4"]["fd"], "source": f"{args.dmd2_config}, {steps} steps (this run)",
            "adherence": report["student_4"]["adherence"], "temporal_error": report["student_4"]["temporal_error"]}


def run(args) -> dict:
    from megadistill.config import load_config
    from megadistill.eval.causal_quality import causal_bar
    from megadistill.train.quality_report import student_weights

    start = time.perf_counter()
    mode = QUICK if args.quick else FULL
    pick = lambda key: getattr(args, key) if getattr(args, key) is not None else mode[key]  # noqa: E731
    pairs_n, ode_steps, sf_steps, dmd2_steps, dmd2_warm_start_steps, samples = (
        pick(k) for k in ("pairs", "ode_steps", "sf_steps", "dmd2_steps", "dmd2_warm_start_steps", "samples"))
    if args.threads:
        torch.set_num_threads(args.threads)
    timings = {}
    with tempfile.TemporaryDirectory(prefix="bench_quality_causal_") as tmp:
        out = Path(args.output_dir or tmp).resolve()
        out.mkdir(parents=True, exist_ok=True)
        ode_cfg = load_config(args.ode_config, ["data.path=."] + args.set_ode)
        dmd2_cfg = load_config(args.dmd2_config, args.set_dmd2)
        if not args.bidirectional_json and args.warm_start != "none":
            # The bidirectional warm start reuses this run's pairs: one step list for all three.
            check_same_step_list(ode_cfg, dmd2_cfg, args.ode_config)
            check_same_step_list(load_config(args.warm_start, ["data.path=."] + args.set_warm_start), dmd2_cfg,
                                 args.warm_start)
        t = time.perf_counter()
        pairs = ode_pairs(ode_cfg, dmd2_cfg, out, pairs_n, args.teacher_steps, args.seed, args.threads,
                          stream="causal-ode-pairs")
        timings["ode_pairs_s"] = time.perf_counter() - t
        t = time.perf_counter()
        init = warm_start_student(args.ode_config, args.set_ode, pairs, out / "ode_init", out / "ode_student",
                                  ode_steps, args.threads, "ODE-init")
        timings["ode_init_s"] = time.perf_counter() - t
        sf_overrides = [f"models.student.path={init}"] + args.set_sf
        t = time.perf_counter()
        sf_ckpt = train(args.sf_config, sf_overrides, out / "self_forcing", sf_steps, args.threads, "self-forcing")
        timings["self_forcing_s"] = time.perf_counter() - t
        rows = measure_causal(args.sf_config, sf_overrides, student_weights(sf_ckpt), samples, args.window,
                              args.sinks, args.batch_size, args.seed)
        t = time.perf_counter()
        bidir = bidirectional_fd(args, out, samples, dmd2_steps, pairs, dmd2_warm_start_steps)
        timings["bidirectional_s"] = time.perf_counter() - t
    keys = ("fd", "adherence", "temporal_error")
    result = {name: {k: rows[name][k] for k in keys} for name in ("causal_1x", "causal_2x")}
    result["bidirectional_student_fd"] = bidir["fd"]
    result["noise_floor_fd"] = rows["causal_1x"]["noise_floor_fd"]
    result["bar"] = causal_bar(rows["causal_1x"]["fd"], rows["causal_1x"]["temporal_error"],
                               rows["causal_2x"]["temporal_error"], bidir["fd"])
    result["wall_s"] = time.perf_counter() - start
    result["reference"] = {"noise_floor_fd_2x": rows["causal_2x"]["noise_floor_fd"],
                           "real_temporal_error_1x": rows["causal_1x"]["real_temporal_error"],
                           "real_temporal_error_2x": rows["causal_2x"]["real_temporal_error"],
                           "bidirectional": bidir}
    result["settings"] = {"pairs": pairs_n, "ode_steps": ode_steps, "sf_steps": sf_steps, "samples": samples,
                          "dmd2_steps": None if args.bidirectional_json else dmd2_steps,
                          "dmd2_warm_start_steps": None if args.bidirectional_json or args.warm_start == "none"
                          else dmd2_warm_start_steps, "window": args.window,
                          "sinks": args.sinks, "seed": args.seed,
                          **timings, **{f"{n}_sample_s": rows[n]["sample_s"] for n in rows}}
    return result


def main(argv=None):
    args = parse_args(argv)
    from megadistill.config import ConfigError

    try:
        result = run(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.json:
        write_json_atomic(args.json, text + "\n")
    bar = result["bar"]
    print(f"{'PASS' if bar['met'] else 'FAIL'}  fd_1x / bidirectional_fd = {bar['fd_ratio_1x']:.3f} (<= 1.2), "
          f"temporal_2x / temporal_1x = {bar['temporal_ratio_2x']:.3f} (<= 1.5)", file=sys.stderr)
    return 1 if args.check and not bar["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
