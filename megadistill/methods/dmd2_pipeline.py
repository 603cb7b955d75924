"""DMD2 under pipeline parallelism: the programs that give the executor's op graphs their meaning.

``dmd2_pipeline_step(method, executor, batch, step, num_microbatches, schedule)`` runs the same
optimizer step as ``DMD2Method.train_step(batch, step)`` as the phases of
``method.step_graph(step, num_microbatches)`` on the pipeline executor
(``megadistill.pipeline.executor``): the batch is split into equal microbatches, each op runs on
its microbatch, and each microbatch's loss is divided by the microbatch count, so the summed
gradients are those of the full-batch mean.

Randomness. ``train_step`` draws, from torch's default generator and in this order: the
generator phase's rollout noise (the starting noise and one re-noising draw per step before the
exit, or the one noising draw of ``data_latent``), its DMD timesteps and its noise; then the same
three for the critic phase. :class:`DMD2Draws` draws exactly these full-batch tensors in that
order before anything runs, on every pipeline rank (the trainer seeds the default generator
equally on the ranks of one pipeline), and each op takes its microbatch's rows. So every stage
knows every op's timestep, noise and conditioning without communication, and the noisy input of
an op is recomputed identically where needed: on stage 0 from the dependencies' results received
there, on the last stage from the same results it produced.

Per microbatch m (names as ``DMD2Method.step_graph``), input ``x_t`` and result on the last stage:

    student.step{j}   x_t = eps_0 (j = 0) or add_noise(x0_{j-1}, eps_j, t_j)   -> x0_j
                      (``data_latent``: add_noise(latents, eps, t_exit))
    teacher.cond      add_noise(x, eps, t) with x the exit step's x0, prompt   -> x0
    teacher.uncond    the same with the unconditional text                     -> x0
    critic.fake       the same, prompt                                          -> x0
    student.backward  loss dmd_loss(x, dmd_gradient(x, guided real, fake)) / M
    critic.denoise    add_noise(x, eps_c, t_c) on the critic phase's sample    -> flow v
    critic.backward   loss flow_matching_loss(v, x, eps_c) / M

A stage module is called ``module(inputs, t, cond, latent_shape)`` (``cond`` as the adapter made
it; the method never looks inside).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional

import torch

from megadistill.diffusion import guided_prediction
from megadistill.pipeline.executor import PipelineExecutor
from megadistill.pipeline.graph import FORWARD, Op
from megadistill.pipeline.schedules import build_schedule

from .base import flow_matching_loss
from .dmd2 import CRITIC_PHASE, GENERATOR_PHASE, DMD2Method, dmd_gradient, dmd_loss


@dataclass
class PhaseDraws:
    """Full-batch random tensors of one phase: rollout noise (one per draw), timesteps, noise."""

    exit_index: int
    rollout: List[torch.Tensor]
    timesteps: torch.Tensor
    noise: torch.Tensor


def _draw_phase(method: DMD2Method, latents: torch.Tensor, exit_index: int) -> PhaseDraws:
    """The draws of one phase of ``train_step``, in its order (see the module docstring)."""
    count = exit_index + 1 if method.config.rollout_mode == "simulate" else 1
    rollout = [torch.randn_like(latents) for _ in range(count)]
    t = method.sample_timesteps(latents.shape[0], latents.device)
    return PhaseDraws(exit_index, rollout, t, torch.randn_like(latents))


def split_raw_batch(raw: Mapping[str, Any], batch_size: int, num_microbatches: int) -> List[Dict[str, Any]]:
    """Split a raw loader batch into ``num_microbatches`` equal ones: tensors whose first dim and
    lists whose length is ``batch_size`` are sliced, anything else is shared."""
    if num_microbatches < 1 or batch_size % num_microbatches:
        raise ValueError(f"num_microbatches={num_microbatches} must divide the batch size {batch_size} "
                         "(equal microbatches keep the mean loss of the full batch)")
    size = batch_size // num_microbatches
    out = []
    for m in range(num_microbatches):
        rows = slice(m * size, (m + 1) * size)
        part = {}
        for key, value in raw.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size:
                part[key] = value[rows]
            elif isinstance(value, (list, tuple)) and len(value) == batch_size:
                part[key] = value[rows]
            else:
                part[key] = value
        out.append(part)
    return out


class DMD2PhaseProgram:
    """The executor's program for one phase (generator or critic) of one DMD2 step."""

    def __init__(self, method: DMD2Method, phase: str, micro: list, uncond: Optional[list], draws: PhaseDraws):
        self.method, self.phase, self.micro, self.uncond, self.draws = method, phase, micro, uncond, draws
        self.num_microbatches = len(micro)
        self.size = micro[0].batch_size
        self.scheduler = method.adapter.noise_scheduler
        self.first_step = 0 if method.config.rollout_mode == "simulate" else draws.exit_index
        self.scores: Dict[tuple, torch.Tensor] = {}   # (microbatch, step) -> x0 of a score op
        self.sample: Dict[int, torch.Tensor] = {}     # microbatch -> graded sample x (with grad)
        self.denoise: Dict[int, tuple] = {}           # microbatch -> (v, x, eps) of critic.denoise
        self.losses: List[float] = []
        self.extra: Dict[str, List[float]] = {"dmd_grad_mean_abs": [], "dmd_timestep_mean": []}

    # -- per-op data ------------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return x[m * self.size:(m + 1) * self.size]

    def _rollout_index(self, op: Op) -> Optional[int]:
        if op.step.startswith("student.step"):
            return int(op.step[len("student.step"):])
        return None

    def _timestep(self, op: Op) -> torch.Tensor:
        j = self._rollout_index(op)
        like = self.micro[op.microbatch].latents
        if j is not None:
            return self.method._timestep(j, like)
        return self._rows(self.draws.timesteps, op.microbatch)

    def _cond(self, op: Op):
        if op.step == "teacher.uncond":
            return self.uncond[op.microbatch]
        return self.micro[op.microbatch].cond

    def stage_args(self, op: Op) -> tuple:
        return self._timestep(op), self._cond(op), tuple(self.micro[op.microbatch].latents.shape)

    def _sample_of(self, op: Op, deps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        (name,) = op.deps
        return deps[name].detach()

    def model_input(self, op: Op, deps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        m = op.microbatch
        j = self._rollout_index(op)
        with torch.no_grad():
            if j is None:  # a score or the critic's denoising forward on the phase's sample
                return self.scheduler.add_noise(self._sample_of(op, deps), self._rows(self.draws.noise, m),
                                                self._timestep(op))
            if self.method.config.rollout_mode == "data_latent":
                return self.scheduler.add_noise(self.micro[m].latents, self._rows(self.draws.rollout[0], m),
                                                self._timestep(op))
            if j == 0:
                return self._rows(self.draws.rollout[0], m)
            return self.scheduler.add_noise(self._sample_of(op, deps), self._rows(self.draws.rollout[j], m),
                                            self._timestep(op))

    def forward_output(self, op: Op, out: torch.Tensor, deps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        m = op.microbatch
        x_t = self.model_input(op, deps)
        v = out.to(x_t.dtype)
        if op.step == "critic.denoise":
            self.denoise[m] = (v, self._sample_of(op, deps), self._rows(self.draws.noise, m))
            return v
        x0 = self.scheduler.x0_from_flow(x_t, v, self._timestep(op))
        if self._rollout_index(op) is not None:
            if op.kind == FORWARD:
                self.sample[m] = x0
        else:
            self.scores[(m, op.step)] = x0.detach()
        return x0

    # -- losses -----------------------------------------------------------------------------------
    def loss(self, op: Op) -> torch.Tensor:
        m = op.microbatch
        if op.step == "student.backward":
            x = self.sample.pop(m)
            with torch.no_grad():
                real = self._real(m)
                fake = self.scores.pop((m, "critic.fake"))
                grad = dmd_gradient(x, real, fake)
            loss = dmd_loss(x, grad)
            self.extra["dmd_grad_mean_abs"].append(grad.abs().mean().item())
            self.extra["dmd_timestep_mean"].append(self._rows(self.draws.timesteps, m).mean().item())
        elif op.step == "critic.backward":
            v, x, eps = self.denoise.pop(m)
            loss = flow_matching_loss(v, x, eps)
        else:
            raise ValueError(f"DMD2 has no loss for backward op {op.name}")
        self.losses.append(loss.item())
        return loss / self.num_microbatches

    def _real(self, m: int) -> torch.Tensor:
        cond = self.scores.pop((m, "teacher.cond"))
        cfg = self.method.config
        if not cfg.uses_uncond:
            return cond
        uncond = self.scores.pop((m, "teacher.uncond"))
        return guided_prediction(cond, uncond, float(cfg.guidance_scale), cfg.guidance_convention)

    def logs(self) -> Dict[str, float]:
        """The phase's scalars as ``train_step`` logs them (means over equal microbatches); only the
        last stage computes losses, elsewhere this is empty."""
        if not self.losses:
            return {}
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        if self.phase == CRITIC_PHASE:
            return {"critic_loss": mean(self.losses)}
        return {"generator_loss": mean(self.losses), "generator_exit_index": float(self.draws.exit_index),
                **{k: mean(v) for k, v in self.extra.items()}}


class DMD2PipelineStep:
    """The phases of ``train_step(batch, step)``: (op graph, program) pairs. Constructing it draws
    the step's random tensors (see the module docstring)."""

    def __init__(self, method: DMD2Method, raw_batch: Mapping[str, Any], step: int, num_microbatches: int):
        adapter = method.adapter
        full = adapter.prepare_batch(raw_batch, latents_source=method.latents_source)
        parts = split_raw_batch(raw_batch, full.batch_size, num_microbatches)
        micro = [adapter.prepare_batch(p, latents_source=method.latents_source) for p in parts]
        graphs = method.step_graph(step, num_microbatches)
        self.phases = []
        if method.is_generator_step(step):
            uncond = [adapter.negative_cond(b) for b in micro] if method.config.uses_uncond else None
            draws = _draw_phase(method, full.latents, method.exit_index(step, GENERATOR_PHASE))
            self.phases.append((graphs[0], DMD2PhaseProgram(method, GENERATOR_PHASE, micro, uncond, draws)))
        draws = _draw_phase(method, full.latents, method.exit_index(step, CRITIC_PHASE))
        self.phases.append((graphs[-1], DMD2PhaseProgram(method, CRITIC_PHASE, micro, None, draws)))


@lru_cache(maxsize=64)
def _cached_schedule(name: str, graph, num_stages: int):
    """Schedules depend on the graph only (the exit index changes it), so each is built once;
    building an interleaved one replays several priority rules (tens of ms)."""
    return build_schedule(name, graph, num_stages)


_NORM_KEYS = {"student_grad_norm": "generator_grad_norm", "critic_grad_norm": "critic_grad_norm"}


def dmd2_pipeline_step(method: DMD2Method, executor: PipelineExecutor, raw_batch: Mapping[str, Any], step: int,
                       num_microbatches: int, schedule: str = "interleaved", costs=None) -> Dict[str, float]:
    """One DMD2 optimizer step on the pipeline (every pipeline rank calls it with the same batch,
    step and seeded default generator). Returns ``train_step``'s logs on every rank (the losses
    are computed on the last stage and shared over the pipeline group)."""
    logs: Dict[str, float] = {}
    for graph, program in DMD2PipelineStep(method, raw_batch, step, num_microbatches).phases:
        plan = _cached_schedule(schedule, graph, executor.num_stages) if costs is None else \
            build_schedule(schedule, graph, executor.num_stages, costs)
        for key, value in executor.run(plan, program).items():
            logs[_NORM_KEYS.get(key, key)] = value
        keys = ["critic_loss"] if program.phase == CRITIC_PHASE else \
            ["generator_loss", "generator_exit_index", "dmd_grad_mean_abs", "dmd_timestep_mean"]
        logs.update(executor.share_from_last_stage(program.logs(), keys))
    return logs
