"""Plan the per-GPU memory of a distillation run: parameters, gradients, optimizer states,
activations, KV cache and forward working sets of every role under a parallel layout.

    python tools/estimate_memory.py --config configs/wan2.1_t2v_1.3B_from_14B_dmd2_4step.yaml \\
        --ds_config configs/ds/zero3_gpu_bf16.json --nodes 8 --gpus-per-node 8 --shapes-only
    ... --set parallel.tp=2 --set parallel.sp=4 --json
    ... --sweep tp1sp1,tp1sp2,tp2sp2 --checkpointing both

No weights are read. Without ``--shapes-only`` the config is loaded with every check (model paths
must exist; a folder's config.json gives the shape). With ``--shapes-only`` a model path that does
not exist is read as a preset when its folder name is one (checkpoints/Wan2.1-T2V-14B ->
wan2.1-t2v-14b), and data / text-encoder paths are not checked. ``--gpu-mem-gb`` is decimal GB
(80 -> 80e9 bytes). The model of every term is documented in megadistill/train/memory.py.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

import _bootstrap  # noqa: F401

from megadistill.config import ConfigError, load_config  # noqa: E402
from megadistill.config.yaml_io import load_yaml_text  # noqa: E402
from megadistill.train.memory import (GIB, Layout, Workload, ZeroSettings, estimate_run, resolve_shapes,  # noqa: E402
                                      roles_of, text_encoder_bytes)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config (YAML, schema v2)")
    ap.add_argument("--ds_config", required=True, help="DeepSpeed JSON config")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU in GB (1e9 bytes)")
    ap.add_argument("--headroom", type=float, default=0.10,
                    help="fraction of GPU memory kept free for allocator fragmentation (default 0.10)")
    ap.add_argument("--reserved-gb", type=float, default=1.0,
                    help="GB per GPU taken by the CUDA context, cuBLAS/NCCL workspaces (default 1.0)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. models.teacher.preset=wan2.1-t2v-14b or parallel.sp=4")
    ap.add_argument("--shapes-only", action="store_true",
                    help="read shapes from presets / folder names; do not require model or data paths")
    ap.add_argument("--no-text-encoder", action="store_true",
                    help="leave the UMT5-XXL text encoder out (text states precomputed or offloaded)")
    ap.add_argument("--teacher-replicated", action="store_true",
                    help="the frozen teacher whole on every rank instead of ZeRO-3 partitioned "
                         "(what models.teacher.zero3_partition: false in the config also says)")
    ap.add_argument("--sweep", help="comma list of layouts tpXspY (e.g. tp1sp1,tp2sp4): one row each")
    ap.add_argument("--checkpointing", choices=("config", "on", "off", "both"), default="config",
                    help="activation checkpointing: as the config says, forced on/off, or both (with --sweep)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    return ap.parse_args(argv)


def load_shapes(args):
    """(RunConfig, shapes, text encoder) from the config file and overrides."""
    try:
        with open(args.config, encoding="utf-8") as f:
            data, _ = load_yaml_text(f.read())
    except OSError as e:
        raise SystemExit(f"error: cannot read --config {args.config}: {e}")
    if not args.shapes_only:
        try:
            load_config(args.config, args.set)  # every check, paths included
        except ConfigError as e:
            raise SystemExit(f"error: {e}\n(the planner needs no weights: pass --shapes-only to read shapes from "
                             "preset names, or --set models.ROLE.preset=NAME / models.ROLE.path=FOLDER)")
    try:
        return resolve_shapes(data, args.set, source=args.config)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def read_ds_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read --ds_config {path}: {e}")


def plan(args, run, shapes, text_encoder, ds, tp, sp, checkpointing):
    world = args.nodes * args.gpus_per_node
    layout = Layout(world, tp=tp, sp=sp, pp=run.parallel.pp, gpus_per_node=args.gpus_per_node)
    wan_any = next(iter(shapes.values()))
    work = Workload.from_run_config(run, wan_any)
    return estimate_run(roles_of(run, shapes), work, layout, ZeroSettings.from_ds_config(ds), checkpointing,
                        gpu_mem_bytes=int(args.gpu_mem_gb * 1e9), headroom=args.headroom,
                        text_encoder_bytes=0 if args.no_text_encoder else text_encoder_bytes(text_encoder),
                        reserved_bytes=int(args.reserved_gb * 1e9),
                        zero3_frozen=not args.teacher_replicated)


def _gib(n):
    return f"{n / GIB:8.2f}"


def format_estimate(est, work) -> str:
    d = est.as_dict()
    L = d["layout"]
    lines = [f"layout: world {L['world']} = pp {L['pp']} x dp {L['dp']} x sp {L['sp']} x tp {L['tp']} "
             f"({L['gpus_per_node']} GPUs/node); ZeRO group dp x sp = {L['zero_group']}; "
             f"activation checkpointing {'on' if est.checkpointing else 'off'}",
             f"workload: micro batch {work.batch}, {work.tokens} tokens (grid {work.grid}), text {work.text_len}",
             f"{'role':<10}{'term':<26}{'GiB':>9}"]
    for name, r in est.roles.items():
        for kind, table in (("static", r.static), ("dynamic", r.dynamic)):
            for term, b in table.items():
                if b:
                    lines.append(f"{name:<10}{term:<26}{_gib(b):>9}   ({kind})")
        lines.append(f"{name:<10}{'= role total':<26}{_gib(r.total):>9}")
    for term, b in est.shared.items():
        lines.append(f"{'shared':<10}{term:<26}{_gib(b):>9}")
    for phase, b in est.phases.items():
        lines.append(f"{'phase':<10}{phase:<26}{_gib(b):>9}   (dynamic bytes of the phase)")
    lines.append(f"total per GPU {_gib(est.total).strip()} GiB (static + largest phase); budget "
                 f"{_gib(est.budget).strip()} GiB = {(1 - est.headroom):.0%} of {est.gpu_mem_bytes / 1e9:g} GB; "
                 f"fits: {'yes' if est.fits else 'NO'}")
    return "\n".join(lines)


def _layouts(spec):
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"tp(\d+)sp(\d+)", item.strip())
        if not m:
            raise SystemExit(f"error: --sweep item {item!r}: write tpXspY, e.g. tp2sp4")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def main(argv=None):
    args = parse_args(argv)
    run, shapes, text_encoder = load_shapes(args)
    ds = read_ds_config(args.ds_config)
    cfg_ckpt = run.parallel.activation_checkpointing
    modes = {"config": [cfg_ckpt], "on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    layouts = _layouts(args.sweep) if args.sweep else [(run.parallel.tp, run.parallel.sp)]
    work = Workload.from_run_config(run, next(iter(shapes.values())))
    results, invalid = [], []
    for tp, sp in layouts:
        try:
            for ckpt in modes:
                results.append(plan(args, run, shapes, text_encoder, ds, tp, sp, ckpt))
        except ValueError as e:
            if not args.sweep:
                raise SystemExit(f"error: tp{tp} sp{sp}: {e}")
            invalid.append(f"tp{tp} sp{sp}: {e}")
    if not results:
        raise SystemExit("error: no valid layout:\n" + "\n".join(invalid))
    if args.json:
        rows = [r.as_dict() for r in results]
        for r in rows:
            r["workload"] = {"micro_batch": work.batch, "tokens": work.tokens, "grid": list(work.grid),
                             "text_len": work.text_len}
            r["shapes"] = {role: {"dim": w.dim, "ffn_dim": w.ffn_dim, "num_heads": w.num_heads,
                                  "num_layers": w.num_layers} for role, w in shapes.items()}
        if invalid:
            rows.append({"invalid_layouts": invalid})
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=1))
        return 0
    if len(results) == 1 and not invalid:
        print(format_estimate(results[0], work))
        return 0
    roles = list(results[0].roles)
    head = f"{'tp':>3}{'sp':>3}{'dp':>4} {'ckpt':<5}" + "".join(f"{r:>10}" for r in roles) + f"{'total':>10}  fits"
    print(f"GiB per GPU; budget {results[0].budget / GIB:.2f} GiB = {1 - args.headroom:.0%} of "
          f"{args.gpu_mem_gb:g} GB; {work.tokens} tokens, micro batch {work.batch}")
    print(head)
    for est in results:
        L = est.layout
        cells = "".join(f"{est.roles[r].total / GIB:>10.2f}" for r in roles)
        print(f"{L.tp:>3}{L.sp:>3}{L.dp:>4} {'on' if est.checkpointing else 'off':<5}{cells}"
              f"{est.total / GIB:>10.2f}  {'yes' if est.fits else 'no'}")
    for line in invalid:
        print(f"invalid  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
