"""DMD2: distribution matching distillation of a few-step student (Yin et al. 2024).

Roles: ``student`` (the few-step generator, trained), ``teacher`` (real score, frozen, guided
with CFG), ``critic`` (fake score, trained on the student's samples).

One training step (``train_step(batch, step)``):

1. Generator update, only when ``step % generator_update_interval == 0`` (two time-scale rule):
   * rollout: the student produces a sample ``x`` (below); gradient flows through the exit
     step only;
   * DMD timestep per sample: integer ``k ~ U[0, T)``, shifted
     ``t = T * shift_sigma(k / T, timestep_shift)``, clamped to ``[min_t, max_t]``;
   * ``x_t = (1 - t/T) x + (t/T) eps``; without grad: ``real = guided(teacher x0 | cond, uncond)``,
     ``fake = critic x0 | cond``;
   * KL gradient (DMD eq. 7-8), without grad: ``grad = nan_to_num((fake - real) / mean|x - real|)``,
     the mean taken per sample over all non-batch dims;
   * loss ``0.5 * mean((x - stopgrad(x - grad))^2)`` in float64, whose gradient w.r.t. ``x`` is
     ``grad / numel(x)``; backward, optimizer step, EMA.
2. Critic update, every step: a fresh rollout without grad gives ``x``; a timestep is drawn as
   above; ``x_t = add_noise(x, eps, t)``; loss ``mean((critic_v(x_t) - (eps - x))^2)``.

GAN term (DMD2 sec. 4.3, off by default): the critic carries a realism classifier ``D`` on its
last hidden states (``models.critic.realism_head: true``) that sees noisy clips, a "diffusion
GAN". With ``gan_generator_weight`` w_g > 0 the generator loss adds
``w_g * mean(softplus(-D(x_t)))`` on its noisy sample ``x_t`` above (the same critic forward that
gives ``fake``; its gradient reaches the student through the critic's input while the critic's own
weights take none). With ``gan_critic_weight`` w_c > 0 the critic loss adds
``w_c * (mean(softplus(D(x_t))) + mean(softplus(-D(y_s))))`` with ``y_s = add_noise(y, eps', s)``
the batch's real latents ``y`` at a freshly drawn timestep ``s``: the method then trains on data
latents (the rollout still starts from noise). DMD2 uses w_g = 3e-3 (ImageNet) to 5e-3 (SDXL) and
w_c = 1e-2. ``gan_max_timestep`` (1000-step scale, off by default) gives the GAN term timesteps of
its own, uniform in ``[min_t, gan_max_t]`` (no shift), for the generator's noisy sample and for both
classifier inputs: at high noise a generated clip and a real one look alike, so a classifier that
only sees the low-noise end looks at what separates them. It costs one more critic forward in each
phase (the fake score keeps the DMD timesteps).

Rollout (``rollout_mode``) over the step list ``t_0 > t_1 > ... > t_{n-1}``
(``denoising_steps``, optionally warped onto the shifted grid):
  * ``simulate`` (data-free): ``x = eps`` taken as the sample at ``t_0``; for ``j < exit``
    without grad ``x0 = student_x0(x, t_j)``, ``x = add_noise(x0, eps_j, t_{j+1})`` with fresh
    noise; at ``j = exit`` the student's ``x0`` (with grad) is the sample.
  * ``data_latent``: ``x = add_noise(data_latent, eps, t_exit)``; one student step (with grad).
The exit index is drawn uniformly from ``[0, n)`` by a ``torch.Generator`` seeded with
``derive_seed(seed, step, phase)``: every rank that is given the same ``seed`` (the run's
training seed, not a per-rank seed) and step derives the same index without communication, so
the trainer broadcasts nothing. Generator and critic phase draw independently.

Guidance: ``guidance_convention`` says what ``guidance_scale`` means -- ``cfg``:
``uncond + s (cond - uncond)``; ``dmd`` (Self-Forcing): ``cond + g (cond - uncond)``, i.e.
``s = g + 1``. Setting a scale without naming its convention is an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megadistill.diffusion import CONVENTIONS, denoising_step_list, guided_prediction, sample_dmd_timesteps
from megadistill.pipeline.graph import BACKWARD, FORWARD, FORWARD_NOGRAD, Op, OpGraph

from .adapter import Adapter, PreparedBatch
from .base import (SamplingSpec, TrainingMethod, config_error, derive_seed, flow_matching_loss, parse_method_config,
                   require_bool, require_choice, require_int, require_number)
from .registry import register_method
from .roles import ModelBundle

METHOD = "dmd2"
ROLLOUT_MODES = ("simulate", "data_latent")
GENERATOR_PHASE, CRITIC_PHASE = "generator", "critic"


@dataclass(frozen=True)
class DMD2Config:
    """``method_config`` of dmd2 (see the module docstring for the meaning of each key).

    ``min_timestep``/``max_timestep`` are given on a 1000-step scale (20/980 = 2%/98% of the
    schedule) and scaled to the scheduler's ``num_train_timesteps``. ``timestep_shift`` shifts the
    DMD and critic timesteps; ``flow_shift`` is the shift of the grid a warped step list is read
    on (only with ``warp_denoising_step``). Both default to the adapter scheduler's shift.
    """

    denoising_steps: Tuple[int, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = False
    rollout_mode: str = "simulate"
    generator_update_interval: int = 5
    guidance_scale: Optional[float] = None
    guidance_convention: Optional[str] = None
    min_timestep: float = 20
    max_timestep: float = 980
    timestep_shift: Optional[float] = None
    flow_shift: Optional[float] = None
    gan_generator_weight: float = 0.0
    gan_critic_weight: float = 0.0
    gan_max_timestep: Optional[float] = None

    def __post_init__(self):
        steps = self.denoising_steps
        if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__") or len(steps) == 0:
            raise config_error(METHOD, "denoising_steps", f"must be a non-empty list of timesteps, got {steps!r}")
        for s in steps:
            require_number(METHOD, "denoising_steps", s)
        object.__setattr__(self, "denoising_steps", tuple(steps))
        require_bool(METHOD, "warp_denoising_step", self.warp_denoising_step)
        require_choice(METHOD, "rollout_mode", self.rollout_mode, ROLLOUT_MODES)
        require_int(METHOD, "generator_update_interval", self.generator_update_interval, minimum=1)
        self._check_guidance()
        require_number(METHOD, "min_timestep", self.min_timestep, 0, 1000)
        require_number(METHOD, "max_timestep", self.max_timestep, 0, 1000)
        if self.min_timestep > self.max_timestep:
            raise config_error(METHOD, "min_timestep", f"{self.min_timestep} is larger than "
                               f"max_timestep {self.max_timestep}")
        require_number(METHOD, "gan_generator_weight", self.gan_generator_weight, 0)
        require_number(METHOD, "gan_critic_weight", self.gan_critic_weight, 0)
        if self.gan_generator_weight > 0 and self.gan_critic_weight == 0:
            raise config_error(METHOD, "gan_generator_weight", "needs gan_critic_weight > 0: without it the "
                               "realism classifier is never trained (DMD2 uses 1e-2)")
        if self.gan_max_timestep is not None:
            require_number(METHOD, "gan_max_timestep", self.gan_max_timestep, 0, 1000)
            if not self.uses_gan:
                raise config_error(METHOD, "gan_max_timestep", "sets the GAN term's timesteps, which is off; "
                                   "set gan_critic_weight > 0 (and models.critic.realism_head: true) or drop it")
            if self.gan_max_timestep <= self.min_timestep:
                raise config_error(METHOD, "gan_max_timestep", f"{self.gan_max_timestep} must be larger than "
                                   f"min_timestep {self.min_timestep}")
        if self.timestep_shift is not None:
            require_number(METHOD, "timestep_shift", self.timestep_shift, positive=True)
        if self.flow_shift is not None:
            require_number(METHOD, "flow_shift", self.flow_shift, positive=True)
            if not self.warp_denoising_step:
                raise config_error(METHOD, "flow_shift", "only warps the step list; it has no effect "
                                   "unless warp_denoising_step is true")

    def _check_guidance(self):
        if self.guidance_convention is not None:
            require_choice(METHOD, "guidance_convention", self.guidance_convention, CONVENTIONS)
        if self.guidance_scale is None:
            if self.guidance_convention is not None:
                raise config_error(METHOD, "guidance_convention", "is set but guidance_scale is not")
            return
        require_number(METHOD, "guidance_scale", self.guidance_scale)
        if self.guidance_convention is None:
            raise config_error(METHOD, "guidance_convention",
                               f"guidance_scale={self.guidance_scale} needs an explicit convention: "
                               "'cfg' (uncond + s*(cond - uncond), Wan/diffusers) or 'dmd' "
                               "(cond + g*(cond - uncond), Self-Forcing; g = s - 1)")

    @property
    def uses_gan(self) -> bool:
        """Whether the critic's realism classifier is trained (and so real latents are needed)."""
        return self.gan_critic_weight > 0

    @property
    def uses_uncond(self) -> bool:
        """Whether the teacher needs its unconditional prediction (guidance is not the identity)."""
        if self.guidance_scale is None:
            return False
        identity = 1.0 if self.guidance_convention == "cfg" else 0.0
        return float(self.guidance_scale) != identity


# -- the formulas -----------------------------------------------------------------------------------

def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """KL gradient of DMD (eq. 7, normalized as eq. 8):
    ``nan_to_num((fake_x0 - real_x0) / mean|x - real_x0|)``, the mean per sample over every
    non-batch dim (keepdim). Callers run it without grad, as the public code does."""
    dims = tuple(range(1, x.dim()))
    normalizer = (x - real_x0).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / normalizer)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((x - stopgrad(x - grad))^2)`` in float64: a surrogate whose gradient w.r.t.
    ``x`` is ``grad / numel(x)`` and whose value is ``0.5 * mean(grad^2)``."""
    x64 = x.double()
    return 0.5 * F.mse_loss(x64, (x64 - grad.double()).detach())


# -- the method -------------------------------------------------------------------------------------

@register_method(METHOD)
class DMD2Method(TrainingMethod):
    """DMD2 over roles student (trainable), teacher (frozen), critic (trainable).

    ``seed`` seeds the exit-index draws (see the module docstring); it must be equal on every
    rank. All other randomness (noise, DMD timesteps) comes from torch's default generator of the
    latents' device, which the trainer seeds per data-parallel rank.
    """

    roles = {"student": True, "teacher": False, "critic": True}

    def __init__(self, bundle: ModelBundle, adapter: Adapter, method_config: Optional[Mapping[str, Any]] = None,
                 seed: int = 0):
        super().__init__(bundle, adapter, method_config)
        self.config = parse_method_config(DMD2Config, method_config, METHOD)
        sched = adapter.noise_scheduler
        T = sched.num_train_timesteps
        cfg = self.config
        self.timestep_shift = sched.shift if cfg.timestep_shift is None else float(cfg.timestep_shift)
        flow_shift = sched.shift if cfg.flow_shift is None else float(cfg.flow_shift)
        try:
            self.denoising_steps = denoising_step_list(cfg.denoising_steps, cfg.warp_denoising_step,
                                                       flow_shift, T)
        except ValueError as err:
            raise config_error(METHOD, "denoising_steps", str(err)) from None
        self.min_t = cfg.min_timestep * T / 1000.0
        self.max_t = cfg.max_timestep * T / 1000.0
        self.gan_max_t = None if cfg.gan_max_timestep is None else cfg.gan_max_timestep * T / 1000.0
        self.seed = int(seed)

    # -- schedule ---------------------------------------------------------------------------------
    @property
    def latents_source(self) -> str:
        return "zeros" if self.config.rollout_mode == "simulate" and not self.config.uses_gan else "data"

    def is_generator_step(self, step: int) -> bool:
        return step % self.config.generator_update_interval == 0

    def rollout_plan(self, step: int, phase: str = GENERATOR_PHASE):
        """What the rollout of ``step``'s phase needs to know; for dmd2 the exit index (subclasses
        with richer rollouts return more)."""
        return self.exit_index(step, phase)

    def plan_logs(self, plan) -> Dict[str, float]:
        return {"generator_exit_index": float(plan)}

    def exit_index(self, step: int, phase: str = GENERATOR_PHASE) -> int:
        """Index into ``denoising_steps`` of the graded rollout step at ``step`` (same on every rank)."""
        if phase not in (GENERATOR_PHASE, CRITIC_PHASE):
            raise ValueError(f"phase must be {GENERATOR_PHASE!r} or {CRITIC_PHASE!r}, got {phase!r}")
        g = torch.Generator().manual_seed(derive_seed("dmd2-exit", self.seed, int(step), phase))
        return int(torch.randint(0, len(self.denoising_steps), (1,), generator=g))

    def sample_timesteps(self, batch_size: int, device) -> torch.Tensor:
        """DMD / critic timesteps ``[B]`` (float64): uniform integer, shifted, clamped."""
        T = self.adapter.noise_scheduler.num_train_timesteps
        return sample_dmd_timesteps(batch_size, None, shift=self.timestep_shift, min_t=self.min_t,
                                    max_t=self.max_t, low=0, high=T, num_train_timesteps=T, device=device)

    def sample_gan_timesteps(self, batch_size: int, device) -> Optional[torch.Tensor]:
        """Timesteps ``[B]`` of the GAN term when it has a range of its own (``gan_max_timestep``):
        integers uniform in ``[ceil(min_t), gan_max_t)``; None otherwise."""
        if self.gan_max_t is None:
            return None
        T = self.adapter.noise_scheduler.num_train_timesteps
        low = math.ceil(self.min_t)
        return sample_dmd_timesteps(batch_size, None, shift=1.0, min_t=self.min_t, max_t=self.gan_max_t, low=low,
                                    high=max(low + 1, math.ceil(self.gan_max_t)), num_train_timesteps=T,
                                    device=device)

    # -- model calls ------------------------------------------------------------------------------
    def _timestep(self, index: int, like: torch.Tensor) -> torch.Tensor:
        return self.denoising_steps[index].to(like.device).expand(like.shape[0]).clone()

    def rollout(self, batch: PreparedBatch, exit_index: int, with_grad: bool) -> torch.Tensor:
        """The student's sample (see the module docstring); with grad only through the exit step."""
        student, ad = self.bundle["student"], self.adapter
        if not 0 <= exit_index < len(self.denoising_steps):
            raise ValueError(f"exit_index {exit_index} outside [0, {len(self.denoising_steps)})")
        with torch.no_grad():
            if self.config.rollout_mode == "simulate":
                x = torch.randn_like(batch.latents)
                for j in range(exit_index):
                    x0 = ad.predict_x0(student, x, self._timestep(j, x), batch.cond)
                    x = ad.add_noise(x0, torch.randn_like(x0), self._timestep(j + 1, x))
            else:
                t_exit = self._timestep(exit_index, batch.latents)
                x = ad.add_noise(batch.latents, torch.randn_like(batch.latents), t_exit)
        with torch.set_grad_enabled(with_grad):
            return ad.predict_x0(student, x, self._timestep(exit_index, x), batch.cond)

    def real_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any) -> torch.Tensor:
        """Teacher's (guided) x0 prediction."""
        teacher = self.bundle["teacher"]
        pred = self.adapter.predict_x0(teacher, x_t, t, cond)
        if not self.config.uses_uncond:
            return pred
        pred_uncond = self.adapter.predict_x0(teacher, x_t, t, uncond)
        cfg = self.config
        return guided_prediction(pred, pred_uncond, float(cfg.guidance_scale), cfg.guidance_convention)

    def generator_loss(self, batch: PreparedBatch, uncond: Any,
                       exit_index: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        x = self.rollout(batch, exit_index, with_grad=True)
        critic, ad = self.bundle["critic"], self.adapter
        w_gan = float(self.config.gan_generator_weight)
        with torch.no_grad():
            t = self.sample_timesteps(x.shape[0], x.device)
            eps = torch.randn_like(x)
        with torch.set_grad_enabled(w_gan > 0):  # the GAN term backpropagates through x_t
            x_t = ad.add_noise(x, eps, t)
        with torch.no_grad():
            real = self.real_x0(x_t.detach(), t, batch.cond, uncond)
        t_gan = self.sample_gan_timesteps(x.shape[0], x.device) if w_gan > 0 else None
        if w_gan > 0 and t_gan is None:  # one critic forward gives the fake score and the realism logits of x_t
            with critic.frozen():
                v, logits = ad.predict_flow_and_realism(critic, x_t, t, batch.cond)
            fake = ad.noise_scheduler.x0_from_flow(x_t.detach(), v.detach(), t)
        else:
            with torch.no_grad():
                fake = ad.predict_x0(critic, x_t, t, batch.cond)
            if w_gan > 0:  # the GAN term sees the sample at its own timesteps
                with critic.frozen():
                    _, logits = ad.predict_flow_and_realism(critic, ad.add_noise(x, torch.randn_like(x), t_gan),
                                                            t_gan, batch.cond)
        with torch.no_grad():
            grad = dmd_gradient(x.detach(), real, fake)
        loss = dmd_loss(x, grad)
        logs = {"dmd_grad_mean_abs": grad.abs().mean().item(), "dmd_timestep_mean": t.mean().item()}
        if w_gan > 0:
            gan = F.softplus(-logits).mean()
            loss = loss + w_gan * gan
            logs.update(gan_generator_loss=gan.item(), realism_fake_prob=torch.sigmoid(logits).mean().item())
        return loss, logs

    def critic_loss(self, batch: PreparedBatch, exit_index: int) -> torch.Tensor:
        """The critic's loss alone (``critic_loss_and_logs`` also returns the GAN term's logs)."""
        return self.critic_loss_and_logs(batch, exit_index)[0]

    def critic_loss_and_logs(self, batch: PreparedBatch, exit_index: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        critic, ad = self.bundle["critic"], self.adapter
        with torch.no_grad():
            x = self.rollout(batch, exit_index, with_grad=False)
        t = self.sample_timesteps(x.shape[0], x.device)
        eps = torch.randn_like(x)
        x_t = ad.add_noise(x, eps, t)
        if not self.config.uses_gan:
            return flow_matching_loss(ad.predict_flow(critic, x_t, t, batch.cond), x, eps), {}
        s = self.sample_gan_timesteps(x.shape[0], x.device)
        if s is None:  # the classifier's fake input is the flow-matching input
            v, fake_logits = ad.predict_flow_and_realism(critic, x_t, t, batch.cond)
            s = self.sample_timesteps(x.shape[0], x.device)
        else:
            v = ad.predict_flow(critic, x_t, t, batch.cond)
            _, fake_logits = ad.predict_flow_and_realism(critic, ad.add_noise(x, torch.randn_like(x), s), s,
                                                         batch.cond)
        loss = flow_matching_loss(v, x, eps)
        y_s = ad.add_noise(batch.latents, torch.randn_like(batch.latents), s)
        _, real_logits = ad.predict_flow_and_realism(critic, y_s, s, batch.cond)
        gan = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        logs = {"critic_flow_loss": loss.item(), "gan_critic_loss": gan.item(),
                "realism_real_prob": torch.sigmoid(real_logits).mean().item()}
        return loss + float(self.config.gan_critic_weight) * gan, logs

    # -- the step ---------------------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, Any], step: int) -> Dict[str, float]:
        prepared = self.adapter.prepare_batch(batch, latents_source=self.latents_source)
        logs: Dict[str, float] = {}
        if self.is_generator_step(step):
            student = self.bundle["student"]
            uncond = self.adapter.negative_cond(prepared) if self.config.uses_uncond else None
            plan = self.rollout_plan(step, GENERATOR_PHASE)
            loss, extra = self.generator_loss(prepared, uncond, plan)
            self.adapter.backward(student, loss)
            _log_norm(logs, "generator_grad_norm", student.step(step))
            logs.update(generator_loss=loss.item(), **self.plan_logs(plan), **extra)
        critic = self.bundle["critic"]
        loss, extra = self.critic_loss_and_logs(prepared, self.rollout_plan(step, CRITIC_PHASE))
        self.adapter.backward(critic, loss)
        _log_norm(logs, "critic_grad_norm", critic.step(step))
        logs.update(critic_loss=loss.item(), **extra)
        return logs

    # -- op graph ---------------------------------------------------------------------------------
    def _rollout_ops(self, m: int, exit_index: int, with_grad: bool) -> List[Op]:
        first = 0 if self.config.rollout_mode == "simulate" else exit_index
        ops: List[Op] = []
        for j in range(first, exit_index + 1):
            kind = FORWARD if with_grad and j == exit_index else FORWARD_NOGRAD
            ops.append(Op("student", kind, m, f"student.step{j}", deps=(ops[-1].name,) if ops else ()))
        return ops

    def sampling_spec(self, num_steps: Optional[int] = None) -> SamplingSpec:
        """The student's few-step list with DMD's sampler (predict x0, re-noise); ``num_steps`` is
        ignored: a DMD2 student is trained for exactly its step list."""
        return SamplingSpec(role="student", timesteps=tuple(float(t) for t in self.denoising_steps),
                            sampler="sde")

    def step_graph(self, step: int, num_microbatches: int) -> List[OpGraph]:
        """Phases of ``train_step(·, step)``: [generator graph] (generator steps only) + critic graph.

        Generator phase, per microbatch m: ``student.step{j}`` for the rollout (forward_nograd
        before the exit, forward at it; ``data_latent`` has the exit step only), then
        ``teacher.cond``, ``teacher.uncond`` (with guidance only) and ``critic.fake``
        (forward_nograd, deps: the exit step), then ``student.backward``.
        Critic phase: the rollout all forward_nograd, ``critic.denoise`` (forward) and
        ``critic.backward``. The exit indices are those ``train_step`` draws at ``step``.
        The GAN term has no graph: its generator loss backpropagates through the critic into the
        student, which an op graph (one backward per forward of the same role) does not express.
        """
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        if self.config.uses_gan:
            raise NotImplementedError("dmd2 with its GAN term has no op graph (and no pipeline program); "
                                      "run it with parallel.pp 1")
        phases: List[OpGraph] = []
        if self.is_generator_step(step):
            exit_index = self.exit_index(step, GENERATOR_PHASE)
            ops: List[Op] = []
            for m in range(num_microbatches):
                rollout = self._rollout_ops(m, exit_index, with_grad=True)
                sample = rollout[-1].name
                scores = [Op("teacher", FORWARD_NOGRAD, m, "teacher.cond", deps=(sample,))]
                if self.config.uses_uncond:
                    scores.append(Op("teacher", FORWARD_NOGRAD, m, "teacher.uncond", deps=(sample,)))
                scores.append(Op("critic", FORWARD_NOGRAD, m, "critic.fake", deps=(sample,)))
                backward = Op("student", BACKWARD, m, "student.backward",
                              deps=(sample,) + tuple(s.name for s in scores), forward_of=sample)
                ops += rollout + scores + [backward]
            phases.append(OpGraph(tuple(ops), title="dmd2 generator step"))
        exit_index = self.exit_index(step, CRITIC_PHASE)
        ops = []
        for m in range(num_microbatches):
            rollout = self._rollout_ops(m, exit_index, with_grad=False)
            denoise = Op("critic", FORWARD, m, "critic.denoise", deps=(rollout[-1].name,))
            ops += rollout + [denoise, Op("critic", BACKWARD, m, "critic.backward", deps=(denoise.name,),
                                          forward_of=denoise.name)]
        phases.append(OpGraph(tuple(ops), title="dmd2 critic step"))
        return phases


def _log_norm(logs: Dict[str, float], key: str, norm: Optional[float]) -> None:
    if norm is not None:  # an engine without a global norm reports none
        logs[key] = norm
