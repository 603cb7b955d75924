"""Plan a pipeline-parallel distillation step: build the schedules of one method's training
steps, simulate them and print makespan, bubble fraction and peak activation memory per stage.

    python tools/plan_pipeline.py --stages 4 --microbatches 8 --method dmd2
    python tools/plan_pipeline.py --stages 4 --microbatches 8 --method dmd2 --json
    python tools/plan_pipeline.py --stages 4 --microbatches 8 --method self_forcing --ascii
    python tools/plan_pipeline.py --stages 4 --microbatches 8 --cost-model measured --costs times.json

Defaults: Wan2.1 14B teacher, 1.3B student and critic, 32760 video tokens, 512 text tokens,
4e14 FLOP/s per GPU (H100 bf16 dense peak ~9.9e14 at ~40% MFU), 25 GB/s p2p, 20 us latency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadistill.pipeline.costs import DiTShape, FlopsCostModel, MeasuredCostModel  # noqa: E402
from megadistill.pipeline.graph import (  # noqa: E402
    dmd2_critic_graph, dmd2_generator_graph, self_forcing_critic_graph, self_forcing_generator_graph)
from megadistill.pipeline.schedules import SCHEDULES, build_schedule, format_schedule  # noqa: E402
from megadistill.pipeline.simulator import simulate  # noqa: E402
from megadistill.pipeline.trace import ascii_timeline, write_chrome_trace  # noqa: E402

STEPS = ("generator", "critic")
GIB = 1024 ** 3


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, required=True, help="pipeline stages P")
    ap.add_argument("--microbatches", type=int, required=True, help="microbatches M per step")
    ap.add_argument("--method", choices=("dmd2", "self_forcing"), default="dmd2")
    ap.add_argument("--schedule", choices=SCHEDULES + ("all",), default="all")
    ap.add_argument("--step", choices=STEPS + ("all",), default="all",
                    help="generator: the iteration that updates the generator; critic: a critic-only iteration")
    ap.add_argument("--cost-model", choices=("flops", "measured"), default="flops")
    ap.add_argument("--costs", help="JSON of measured per-op times (with --cost-model measured)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--ascii", action="store_true", help="print an ASCII timeline of every simulated schedule")
    ap.add_argument("--ascii-width", type=int, default=100)
    ap.add_argument("--print-schedule", action="store_true", help="print every stage's instruction list")
    ap.add_argument("--chrome-trace", metavar="FILE", help="write a Chrome/Perfetto trace of every simulation")
    ap.add_argument("--max-inflight", type=int, default=None,
                    help="interleaved: at most this many microbatches' activations held per stage and role")
    ap.add_argument("--max-activation-gib", type=float, default=None,
                    help="interleaved: at most this many GiB of held activations per stage")
    ap.add_argument("--generator-update-interval", type=int, default=5,
                    help="the generator updates every N-th iteration; the critic every iteration")
    ap.add_argument("--no-cfg", action="store_true", help="teacher without the unconditional forward")
    ap.add_argument("--no-critic-update", action="store_true",
                    help="dmd2: the generator step without the critic update (the generator turn alone)")
    for role, (dim, ffn, heads, layers) in {"teacher": (5120, 13824, 40, 40), "student": (1536, 8960, 12, 30),
                                            "critic": (1536, 8960, 12, 30)}.items():
        ap.add_argument(f"--{role}-dim", type=int, default=dim)
        ap.add_argument(f"--{role}-ffn", type=int, default=ffn)
        ap.add_argument(f"--{role}-heads", type=int, default=heads)
        ap.add_argument(f"--{role}-layers", type=int, default=layers)
    ap.add_argument("--tokens", type=int, default=32760, help="video tokens of a whole clip")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--num-blocks", type=int, default=7, help="self_forcing: causal blocks per clip")
    ap.add_argument("--denoise-steps", type=int, default=4, help="self_forcing: denoising steps per block")
    ap.add_argument("--exit-step", type=int, default=None, help="self_forcing: graded step (default: the last)")
    ap.add_argument("--flops-per-second", type=float, default=400e12)
    ap.add_argument("--p2p-bandwidth", type=float, default=25e9, help="bytes/s")
    ap.add_argument("--p2p-latency", type=float, default=20e-6, help="seconds")
    ap.add_argument("--dtype-bytes", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cost_model == "measured" and not args.costs:
        ap.error("--cost-model measured needs --costs FILE")
    if args.method == "self_forcing" and args.tokens % args.num_blocks:
        ap.error(f"--tokens {args.tokens} is not divisible by --num-blocks {args.num_blocks}")
    if args.generator_update_interval < 1:
        ap.error("--generator-update-interval must be >= 1")
    return args


def make_graphs(args) -> dict:
    m = args.microbatches
    if args.method == "dmd2":
        graphs = {"generator": dmd2_generator_graph(m, cfg=not args.no_cfg, update_critic=not args.no_critic_update),
                  "critic": dmd2_critic_graph(m)}
    else:
        sf = dict(num_blocks=args.num_blocks, num_denoise_steps=args.denoise_steps, exit_step=args.exit_step,
                  block_tokens=args.tokens // args.num_blocks)
        graphs = {"generator": self_forcing_generator_graph(m, cfg=not args.no_cfg, **sf),
                  "critic": self_forcing_critic_graph(m, **sf)}
    return {k: v for k, v in graphs.items() if args.step in ("all", k)}


def make_costs(args):
    if args.cost_model == "measured":
        return MeasuredCostModel.from_json(args.costs)
    roles = {r: DiTShape(dim=getattr(args, f"{r}_dim"), ffn_dim=getattr(args, f"{r}_ffn"),
                         num_heads=getattr(args, f"{r}_heads"), num_layers=getattr(args, f"{r}_layers"))
             for r in ("teacher", "student", "critic")}
    return FlopsCostModel(roles=roles, tokens=args.tokens, text_len=args.text_len,
                          flops_per_second=args.flops_per_second, p2p_bandwidth=args.p2p_bandwidth,
                          p2p_latency=args.p2p_latency, dtype_bytes=args.dtype_bytes)


def cycle_summary(results: dict, num_stages: int, interval: int) -> dict:
    """One generator iteration plus interval-1 critic-only iterations, per schedule."""
    out = {}
    for name in results.get("generator", {}):
        if name not in results.get("critic", {}):
            continue
        gen, crit = results["generator"][name], results["critic"][name]
        makespan = gen.makespan + (interval - 1) * crit.makespan
        busy = sum(gen.busy_per_stage) + (interval - 1) * sum(crit.busy_per_stage)
        out[name] = {"makespan": makespan, "makespan_per_iteration": makespan / interval,
                     "bubble_fraction": 1.0 - busy / (num_stages * makespan) if makespan > 0 else 0.0}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    costs = make_costs(args)
    cap_bytes = int(args.max_activation_gib * GIB) if args.max_activation_gib is not None else None
    names = SCHEDULES if args.schedule == "all" else (args.schedule,)
    results: dict = {}
    traces = []
    graphs = make_graphs(args)
    for step, graph in graphs.items():
        for name in names:
            schedule = build_schedule(name, graph, args.stages, costs, max_inflight_activations=args.max_inflight,
                                      max_activation_bytes=cap_bytes)
            result = simulate(schedule, costs)
            results.setdefault(step, {})[name] = result
            traces.append((f"{step} step, {name}", result))
            if args.print_schedule and not args.json:
                print(format_schedule(schedule), end="\n\n")
    cycle = cycle_summary(results, args.stages, args.generator_update_interval)
    if args.chrome_trace:
        write_chrome_trace(traces, args.chrome_trace)
    if args.json:
        print(json.dumps({
            "method": args.method, "stages": args.stages, "microbatches": args.microbatches,
            "cost_model": args.cost_model,
            "steps": {step: {name: r.summary() for name, r in by_name.items()} for step, by_name in results.items()},
            "cycle": {"generator_update_interval": args.generator_update_interval, **cycle},
        }, indent=2))
        return 0
    print(f"{args.method}: {args.stages} stages, {args.microbatches} microbatches, {args.cost_model} cost model")
    for step, by_name in results.items():
        print(f"\n{step} step: {graphs[step].title}")
        for name, r in by_name.items():
            per_stage = " ".join(f"{b:.1%}" for b in r.bubble_fraction_per_stage)
            peak = " ".join(f"{b / GIB:.1f}" for b in r.peak_activation_bytes_per_stage)
            print(f"  {name:<12} makespan {r.makespan:9.4f} s  bubble {r.bubble_fraction:6.1%}  "
                  f"per stage [{per_stage}]  peak activations GiB [{peak}]")
        if len(by_name) == 2:
            seq, inter = by_name["sequential"], by_name["interleaved"]
            ratio = inter.bubble_fraction / seq.bubble_fraction if seq.bubble_fraction > 0 else float("nan")
            print(f"  interleaved/sequential: bubble x{ratio:.3f}, makespan x{inter.makespan / seq.makespan:.3f}")
        if args.ascii:
            for r in by_name.values():
                print(ascii_timeline(r, args.ascii_width))
    if cycle:
        print(f"\nper {args.generator_update_interval} iterations (1 generator step + "
              f"{args.generator_update_interval - 1} critic-only steps):")
        for name, c in cycle.items():
            print(f"  {name:<12} makespan {c['makespan']:9.4f} s  bubble {c['bubble_fraction']:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
