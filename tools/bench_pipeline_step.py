#!/usr/bin/env python
"""Wall time of DMD2 steps on the pipeline executor, schedules side by side, in one run.

    python tools/bench_pipeline_step.py --config configs/tiny_dmd2.yaml --stages 2 --repeats 7 \\
        --json pipeline_bench.json

Spawns ``--stages`` gloo processes (one per stage, CPU) holding the recipe's student, teacher
and critic (their presets, random weights), AdamW with the recipe's lr, betas and grad clip, and
runs DMD2 steps of the recipe's method_config with ``--batch`` samples in ``--microbatches``
microbatches (random text states; the recipe's latent shape). Each schedule has its own copy of
the models. Per repeat, every schedule runs one generator step (a step with ``step %
generator_update_interval == 0``: generator phase + critic phase) and one critic-only step under
each schedule, the schedules' order alternating between repeats (ABBA) so that load changes hit
both alike; ``median_paired_ratio`` is the median over repeats of interleaved / sequential for
the same step. A step's time is the slowest rank's
wall time between two barriers; ``recv_wait_s`` is the time a rank spent blocked in receives
(idle: bubbles, and on a shared CPU also peers waiting for a core). The first ``--warmup``
repeats are dropped; the JSON has the median and all samples per schedule and step kind.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import _bootstrap  # noqa: F401

ROOT = _bootstrap.ROOT
SCHEDULES = ("sequential", "interleaved")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(path: str) -> dict:
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    if cfg.get("recipe", {}).get("method") != "dmd2" or cfg.get("recipe", {}).get("family") != "wan":
        sys.exit(f"{path}: this benchmark runs wan + dmd2 recipes, got recipe {cfg.get('recipe')}")
    return cfg


def _roles(cfg: dict, stage: int, num_stages: int, seed: int):
    import torch

    from megadistill.models.wan import WanDiT, get_preset, init_weights
    from megadistill.models.wan.pipeline_stage import WanPipelineStage
    from megadistill.pipeline.executor import StageRole

    train = cfg["training"]
    roles = {}
    for i, name in enumerate(("student", "teacher", "critic")):
        model = init_weights(WanDiT(get_preset(cfg["models"][name]["preset"])), seed=seed + i)
        part = WanPipelineStage(model, stage, num_stages)
        if name == "teacher":
            part.requires_grad_(False)
            roles[name] = StageRole(name, part)
            continue
        lr = (train.get("optim") or {}).get(name, {}).get("lr", train["lr"])
        opt = torch.optim.AdamW(part.parameters(), lr=lr, betas=tuple(train["betas"]))
        roles[name] = StageRole(name, part, opt, grad_clip=train.get("grad_clip"),
                                replicated=part.replicated_parameters())
    return roles


def _method(cfg: dict, text_len: int, text_dim: int):
    import torch

    from megadistill.diffusion import FlowMatchScheduler
    from megadistill.methods import ModelBundle, RoleHandle
    from megadistill.methods.dmd2 import DMD2Method
    from megadistill.models.wan.adapter import WanAdapter

    # The method's networks are never called by the pipeline step; tiny placeholders fill the roles.
    bundle = ModelBundle({n: RoleHandle(n, torch.nn.Linear(1, 1), n != "teacher",
                                        optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
                                        if n != "teacher" else None)
                          for n in ("student", "teacher", "critic")})
    pc = cfg["pipeline_config"]
    negative = torch.randn(text_len, text_dim, generator=torch.Generator().manual_seed(1))
    adapter = WanAdapter(None, FlowMatchScheduler(1000, float(pc.get("flow_shift", 5.0))),
                         latent_shape=pc["latent_shape"], negative_text_states=negative)
    return DMD2Method(bundle, adapter, cfg["method_config"], seed=cfg["training"].get("seed", 0))


def _worker(rank, world, port, cfg, args, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    if args.pin:  # one core per rank, so the two ranks never share a core with each other
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    import megadistill.distributed as md
    from megadistill.methods.dmd2_pipeline import dmd2_pipeline_step
    from megadistill.models.wan import get_preset
    from megadistill.pipeline.executor import PipelineExecutor

    md.initialize(pp=world, backend="gloo")
    stage = md.get_pp_rank()
    student = get_preset(cfg["models"]["student"]["preset"])
    text_len = int(cfg["pipeline_config"].get("text_len", student.text_len))
    method = _method(cfg, text_len, student.text_dim)
    executors = {s: PipelineExecutor(_roles(cfg, stage, world, seed=0), stage, world, md.get_pp_group())
                 for s in SCHEDULES}
    interval = method.config.generator_update_interval
    samples = {s: {"generator_step": [], "critic_step": []} for s in SCHEDULES}
    waits = {s: {"generator_step": [], "critic_step": []} for s in SCHEDULES}
    for r in range(args.warmup + args.repeats):
        for kind, step in (("generator_step", r * interval), ("critic_step", r * interval + 1)):
            g = torch.Generator().manual_seed(step)
            raw = {"text_states": torch.randn(args.batch, text_len, student.text_dim, generator=g)}
            for s in (SCHEDULES if r % 2 == 0 else SCHEDULES[::-1]):  # ABBA: drift in load hits both alike
                ex = executors[s]
                torch.manual_seed(1000 + step)
                ex.link.recv_wait_s = 0.0
                dist.barrier()
                start = time.perf_counter()
                dmd2_pipeline_step(method, ex, raw, step, args.microbatches, s)
                elapsed = torch.tensor([time.perf_counter() - start, ex.link.recv_wait_s], dtype=torch.float64)
                gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
                dist.all_gather(gathered, elapsed)
                if r >= args.warmup:
                    samples[s][kind].append(max(float(t[0]) for t in gathered))
                    waits[s][kind].append([float(t[1]) for t in gathered])
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"samples": samples, "recv_wait": waits}, f)
    md.destroy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_dmd2.yaml"))
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default: training.micro_batch_size)")
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--pin", action="store_true", help="pin rank r to CPU core r (mod the core count)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = _recipe(args.config)
    if args.batch is None:
        args.batch = int(cfg["training"]["micro_batch_size"])
    if args.batch % args.microbatches:
        sys.exit(f"--microbatches {args.microbatches} must divide --batch {args.batch}")
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "samples.json")
        mp.start_processes(_worker, args=(args.stages, _free_port(), cfg, args, out_path), nprocs=args.stages,
                           join=True, start_method="fork")
        with open(out_path) as f:
            raw = json.load(f)
    result = {"config": os.path.relpath(args.config, ROOT), "stages": args.stages, "batch": args.batch,
              "microbatches": args.microbatches, "repeats": args.repeats, "warmup": args.warmup,
              "threads_per_rank": args.threads, "pinned": args.pin, "cpu_count": os.cpu_count(),
              "machine": platform.machine(),
              "load_average_1m": os.getloadavg()[0], "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "schedules": {}}
    for s in SCHEDULES:
        entry = {}
        for kind, times in raw["samples"][s].items():
            waits = raw["recv_wait"][s][kind]
            entry[kind] = {"median_s": statistics.median(times), "samples_s": times,
                           "median_recv_wait_s_per_rank": [statistics.median(w[i] for w in waits)
                                                           for i in range(args.stages)]}
        result["schedules"][s] = entry
    seq, inter = result["schedules"]["sequential"], result["schedules"]["interleaved"]
    result["interleaved_over_sequential"] = {k: inter[k]["median_s"] / seq[k]["median_s"] for k in seq}
    # the same step (same exit index, same load period) under both schedules: the paired ratio
    result["median_paired_ratio"] = {k: statistics.median(i / q for i, q in zip(inter[k]["samples_s"],
                                                                                seq[k]["samples_s"])) for k in seq}
    text = json.dumps(result, indent=2)
    if args.json:
        tmp_path = args.json + ".tmp"
        with open(tmp_path, "w") as f:
            f.write(text + "\n")
        os.replace(tmp_path, args.json)
    print(text)


if __name__ == "__main__":
    main()
