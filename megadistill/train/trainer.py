"""The training loop. It knows no algorithm: each step it hands a batch to ``method.train_step``,
then logs, counts skipped steps and writes checkpoints.

    for step in range(start, max_steps):
        logs = method.train_step(next(data), step)
        non-finite loss/grad -> counted; after N in a row: checkpoint and stop
        every log_every:        one line, TensorBoard scalars
        every checkpoint_every: atomic role-based checkpoint
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megadistill.config import config_to_dict, save_config

from .checkpoint import load_training_checkpoint, resolve_resume, save_training_checkpoint
from .validation import default_prompts, run_validation


class NonFiniteError(RuntimeError):
    pass


def seed_everything(seed: int, rank: int):
    import random

    import numpy as np

    s = seed * 100_003 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _all_ranks_max(value: float) -> float:
    """The step is skipped on every rank if it is non-finite on one (ranks must agree)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class Trainer:
    def __init__(self, run, output_dir, max_steps: int | None = None, checkpoint_every: int | None = None,
                 resume=None, progress: bool = True):
        cfg = run.cfg
        self.run = run
        self.output_dir = Path(output_dir)
        self.max_steps = max_steps or cfg.training.max_steps
        self.checkpoint_every = cfg.checkpoint.every if checkpoint_every is None else checkpoint_every
        self.resume = cfg.checkpoint.resume if resume is None else resume
        self.log_every = cfg.logging.log_every
        self.max_nonfinite = cfg.training.max_nonfinite_steps
        self.progress = progress and _rank() == 0
        self.step = 0
        self.skipped_total = 0
        self.skipped_in_row = 0
        self.history = []  # (step, logs) of this process, for tests and the final summary
        self.writer = None
        self.validation_every = cfg.logging.validation_every
        self.pipeline = cfg.parallel.pp > 1
        if self.pipeline and self.validation_every:
            # Sampling needs the whole student on one rank; a stage holds a slice of it.
            self.validation_every = 0
            if _rank() == 0:
                print(f"parallel.pp={cfg.parallel.pp}: validation sampling is skipped "
                      "(logging.validation_every ignored)", flush=True)
        # Fixed before any batch is drawn, so a resumed run validates on the same prompts.
        self.validation_prompts = default_prompts(cfg, run.data) if self.validation_every else []

    # -- state --
    def trainer_state(self) -> dict:
        return {"step": self.step, "skipped_total": self.skipped_total,
                "skipped_in_row": self.skipped_in_row, "data": self.run.data.state_dict()}

    def save(self):
        return save_training_checkpoint(self.output_dir, self.step, self.run.bundle.roles,
                                        self.trainer_state(), config_to_dict(self.run.cfg),
                                        keep_last=self.run.cfg.checkpoint.keep_last, **self._stage())

    def _stage(self) -> dict:
        """Pipeline stage of this rank when the roles are stage slices (files per stage)."""
        if not self.pipeline:
            return {}
        from megadistill import distributed as grid

        return {"stage": grid.get_pp_rank(), "num_stages": grid.get_pp_size()}

    def maybe_resume(self):
        path = resolve_resume(self.resume, self.output_dir)
        if path is None:
            return None
        self._check_layout(path)
        state = load_training_checkpoint(path, self.run.bundle.roles, **self._stage())
        self.step = int(state["step"])
        self.skipped_total = int(state["skipped_total"])
        self.skipped_in_row = int(state["skipped_in_row"])
        self.run.data.load_state_dict(state["data"])
        return path

    def _check_layout(self, path):
        """A checkpoint holds DeepSpeed partitions of tp shards: it resumes only under the layout
        (tp, sp, pp; the world size is checked on load) that wrote it."""
        saved = (json.loads((Path(path) / "meta.json").read_text()).get("config") or {}).get("parallel")
        p = self.run.cfg.parallel
        if saved is None:
            return
        want = {"tp": p.tp, "sp": p.sp, "pp": p.pp}
        got = {k: saved.get(k, 1) for k in want}
        if got != want:
            raise ValueError(f"checkpoint {path} was written with parallel {got}, this run has {want}: resume "
                             "with the same parallel.tp/sp/pp (export the weights to re-shard them offline)")

    # -- logging --
    def _open_logs(self):
        if _rank() != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.run.cfg, self.output_dir / "config.yaml")
        if self.run.cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    def _log(self, step, logs, dt, samples):
        if _rank() != 0:
            return
        scalars = {**logs, "step_time_s": dt, "samples_per_s": samples / dt if dt > 0 else 0.0,
                   "skipped_steps": self.skipped_total}
        if hasattr(self.run.data, "skipped"):  # corrupt samples/shards the stream stepped over
            scalars["data_skipped"] = int(self.run.data.skipped)
        for h in self.run.bundle.roles.values():
            if h.trainable:
                opt = h.engine.optimizer if h.engine is not None else h.optimizer
                scalars[f"lr/{h.name}"] = opt.param_groups[0]["lr"]
        if torch.cuda.is_available():
            scalars["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.writer is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
        with open(self.output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items()
                         if isinstance(v, float) and not k.startswith("lr/"))
        print(f"step {step}/{self.max_steps} {shown}", flush=True)

    def validate(self):
        out = run_validation(self.run, self.step, self.output_dir, self.validation_prompts, self.writer,
                             seed=self.run.cfg.training.seed)
        if out is not None:
            print(f"step {self.step}: validation samples in {out}", flush=True)

    # -- loop --
    def fit(self):
        self._open_logs()
        # Fresh runs draw their noise from (seed, data-parallel rank): data-parallel replicas differ,
        # tensor/sequence-parallel peers of one replica draw the same noise, reruns repeat. A resumed
        # run gets every RNG state back from the checkpoint instead.
        from megadistill import distributed as grid

        seed_everything(self.run.cfg.training.seed, grid.get_dp_rank() if grid.is_initialized() else 0)
        resumed = self.maybe_resume()
        if resumed is not None and _rank() == 0:
            print(f"resumed from {resumed} at step {self.step}", flush=True)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        # Samples per step: one micro-batch per data-parallel rank (tp and sp peers share theirs).
        batch_size = self.run.cfg.training.micro_batch_size * (grid.get_dp_size() if grid.is_initialized() else 1)
        while self.step < self.max_steps:
            t0 = time.perf_counter()
            batch = next(self.run.data)
            logs = self.run.method.train_step(batch, self.step)
            worst = _all_ranks_max(max((0.0 if math.isfinite(v) else math.inf)
                                       for v in logs.values() if isinstance(v, float)) if logs else 0.0)
            if not math.isfinite(worst):
                self.skipped_total += 1
                self.skipped_in_row += 1
                logs = {**logs, "skipped": 1.0}
            else:
                self.skipped_in_row = 0
            self.history.append((self.step, logs))
            dt = time.perf_counter() - t0
            self.step += 1
            if bar is not None:
                bar.update(1)
            if self.step % self.log_every == 0 or self.step == self.max_steps:
                self._log(self.step, logs, dt, batch_size)
            if self.max_nonfinite and self.skipped_in_row >= self.max_nonfinite:
                path = self.save()
                raise NonFiniteError(
                    f"{self.skipped_in_row} consecutive steps had a non-finite loss or gradient "
                    f"(up to step {self.step}); stopped and wrote {path}. Lower the learning rate, "
                    "check the data, or raise training.max_nonfinite_steps.")
            if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                self.save()
            if self.validation_every and self.step % self.validation_every == 0:
                self.validate()
        if bar is not None:
            bar.close()
        if not self.checkpoint_every or self.step % self.checkpoint_every:
            self.save()
        if self.validation_every and self.step % self.validation_every:
            self.validate()
        if self.writer is not None:
            self.writer.close()
        return self.history
