"""ODE-init: knowledge distillation of a teacher's ODE trajectories into a few-step student -- the
initialization of CausVid / Self-Forcing before DMD (a block-causal student), or a warm start of a
bidirectional DMD2 student (DMD's regression onto teacher ODE pairs, as a stage of its own).

Data (``tools/generate_ode_pairs.py``): per prompt, the teacher's deterministic ODE sample from
noise, with the states ``x_{t_k}`` at the kept timesteps ``t_0 > ... > t_{K-1} > 0`` (raw batch
``ode_states [B, K, C, F, H, W]``, ``ode_timesteps [B, K]``) and the clean endpoint ``x_0``
(``latents``).

Loss, per sample: for each block of the student's n frames an index ``k ~ U{0..K-1}`` (one per
block: ``timestep_granularity: block``, the public ``timestep_type: causal``; or one per frame, or
one per clip -- the only choice for a bidirectional student), the input ``x`` takes every frame
from the state of its block's index, with per-frame timesteps ``t [B, F]``; the student's masked
(teacher-forcing) path predicts ``x0_hat = x - sigma(t) v(x, t)`` for the whole clip at once and

    loss = mean((x0_hat - x_0)^2)        (float32)

The kept timesteps must be the student's step list (``denoising_steps``, optionally warped): a
batch whose ``ode_timesteps`` differ is an error, so the student learns exactly the steps it
samples with (``sampling_spec``: predict x0 and re-noise along the list; block by block for a
block-causal student).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megadistill.diffusion import FlowMatchScheduler, denoising_step_list
from megadistill.pipeline.graph import OpGraph, single_role_graph

from .adapter import CausalAdapter, PreparedBatch
from .base import SamplingSpec, TrainingMethod, config_error, parse_method_config, require_bool, require_choice
from .registry import register_method
from .roles import ModelBundle, RoleError

METHOD = "ode_init"
GRANULARITIES = ("block", "frame", "clip")


@dataclass(frozen=True)
class OdeInitConfig:
    """``method_config`` of ode_init.

    ``denoising_steps`` / ``warp_denoising_step`` / ``flow_shift``: the student's step list, as in
    dmd2 (the kept timesteps of the data must equal it). ``timestep_granularity``: ``block``
    (default), ``frame`` or ``clip`` -- how the state index is drawn (see the module doc).
    """

    denoising_steps: Tuple[int, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = False
    flow_shift: Optional[float] = None
    timestep_granularity: str = "block"

    def __post_init__(self):
        object.__setattr__(self, "denoising_steps", tuple(self.denoising_steps))
        require_bool(METHOD, "warp_denoising_step", self.warp_denoising_step)
        require_choice(METHOD, "timestep_granularity", self.timestep_granularity, GRANULARITIES)
        if self.flow_shift is not None and not (isinstance(self.flow_shift, (int, float)) and self.flow_shift > 0):
            raise config_error(METHOD, "flow_shift", f"must be a number > 0, got {self.flow_shift!r}")


# -- trajectories (also used by tools/generate_ode_pairs.py) -----------------------------------------

def trajectory_timesteps(sampling_timesteps: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The sampler's grid with the kept timesteps inserted (descending, distinct), so that the
    trajectory passes through every kept timestep exactly."""
    ts, keep = torch.as_tensor(sampling_timesteps, dtype=torch.float64), torch.as_tensor(keep, dtype=torch.float64)
    if keep.dim() != 1 or keep.numel() == 0 or bool((keep <= 0).any()):
        raise ValueError(f"kept timesteps must be a non-empty list of values > 0, got {keep.tolist()}")
    if bool((keep > ts[0]).any()):
        raise ValueError(f"kept timesteps {keep.tolist()} start above the sampler's first timestep {ts[0].item()}")
    return torch.unique(torch.cat([ts, keep])).flip(0)


@torch.no_grad()
def ode_trajectory(predict_flow: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                   timesteps: torch.Tensor, keep: Sequence[float],
                   scheduler: FlowMatchScheduler) -> Tuple[torch.Tensor, torch.Tensor]:
    """Euler on the flow from ``noise`` (the sample at ``timesteps[0]``) down to sigma 0 --
    exactly :func:`megadistill.diffusion.ode_sample` over the same grid -- recording the state at
    each kept timestep (every kept timestep must be a grid point: see :func:`trajectory_timesteps`).

    Returns ``(states [B, K, ...] in the order of keep, endpoint [B, ...])`` in ``noise``'s dtype.
    """
    from megadistill.diffusion.scheduler import _compute_dtype

    ts = torch.as_tensor(timesteps, dtype=torch.float64)
    keep = [float(k) for k in keep]
    where = {}
    for k in keep:
        hit = (ts == k).nonzero()
        if hit.numel() != 1:
            raise ValueError(f"kept timestep {k} is not a point of the sampling grid; use trajectory_timesteps()")
        where[k] = int(hit)
    sigmas = torch.cat([scheduler.sigma_from_timestep(ts), ts.new_zeros(1)]).tolist()
    x = noise.to(_compute_dtype(noise.dtype))
    states: Dict[int, torch.Tensor] = {}
    for i, t in enumerate(ts):
        states[i] = x.to(noise.dtype)
        v = predict_flow(x.to(noise.dtype), t.to(noise.device).expand(noise.shape[0]).clone())
        x = x + (sigmas[i + 1] - sigmas[i]) * v.to(x.dtype)
        for j in [j for j in states if j not in where.values()]:
            del states[j]  # keep only the kept states in memory
    return torch.stack([states[where[k]] for k in keep], dim=1), x.to(noise.dtype)


# -- the method -------------------------------------------------------------------------------------

@register_method(METHOD)
class OdeInitMethod(TrainingMethod):
    """Regression of the ``student`` onto the clean endpoint of teacher ODE trajectories (data:
    ``ode_states``, ``ode_timesteps``, ``latents``). ``adapter`` must implement
    :class:`CausalAdapter` (a bidirectional student, ``is_block_causal`` False, takes
    ``timestep_granularity: clip``)."""

    roles = {"student": True}

    def __init__(self, bundle: ModelBundle, adapter: CausalAdapter,
                 method_config: Optional[Mapping[str, Any]] = None, seed: int = 0):
        super().__init__(bundle, adapter, method_config)
        if "teacher" in bundle:
            raise RoleError("ode_init trains on precomputed trajectories (tools/generate_ode_pairs.py, "
                            "data.kind: webdataset); online generation with a teacher is not supported, "
                            "remove models.teacher")
        self.config = parse_method_config(OdeInitConfig, method_config, METHOD)
        sched = adapter.noise_scheduler
        shift = sched.shift if self.config.flow_shift is None else float(self.config.flow_shift)
        try:
            self.denoising_steps = denoising_step_list(self.config.denoising_steps, self.config.warp_denoising_step,
                                                       shift, sched.num_train_timesteps)
        except ValueError as err:
            raise config_error(METHOD, "denoising_steps", str(err)) from None
        self.causal = bool(adapter.is_block_causal(bundle["student"]))
        if not self.causal and self.config.timestep_granularity != "clip":
            raise config_error(METHOD, "timestep_granularity",
                               f"{self.config.timestep_granularity!r} needs a block-causal student "
                               "(models.student.causal: true); a bidirectional student takes 'clip'")
        self.block_frames = adapter.frames_per_block(bundle["student"]) if self.causal else None
        self.seed = int(seed)  # draws are per rank (torch's generator); kept for a uniform constructor

    def trajectory(self, raw: Mapping[str, Any], batch: PreparedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(states [B, K, C, F, H, W], timesteps [B, K] float64)`` of a raw batch, checked."""
        if raw.get("ode_states") is None or raw.get("ode_timesteps") is None:
            raise ValueError(f"ode_init needs ODE trajectories in the batch (ode_states, ode_timesteps; keys: "
                             f"{sorted(raw)}); write them with tools/generate_ode_pairs.py")
        x0 = batch.latents
        states = torch.as_tensor(raw["ode_states"]).to(device=x0.device, dtype=x0.dtype)
        ts = torch.as_tensor(raw["ode_timesteps"]).to(device=x0.device, dtype=torch.float64)
        if states.dim() != 6 or states.shape[0] != x0.shape[0] or states.shape[2:] != x0.shape[1:]:
            raise ValueError(f"ode_states {tuple(states.shape)} do not fit latents {tuple(x0.shape)}: "
                             "expected [B, K, C, F, H, W]")
        want = self.denoising_steps.to(ts.device)
        if ts.shape != (states.shape[0], states.shape[1]) or not torch.allclose(ts, want.expand_as(ts), atol=1e-6,
                                                                              rtol=0):
            raise ValueError(f"the trajectories' kept timesteps {ts[0].tolist()} differ from the student's step "
                             f"list {want.tolist()} (method_config.denoising_steps / warp_denoising_step); "
                             "generate the pairs with --keep-steps matching it")
        return states, ts

    def draw_indices(self, batch_size: int, frames: int, num_states: int, device) -> torch.Tensor:
        """State index per frame ``[B, F]``: one draw per block, per frame or per clip."""
        g = self.config.timestep_granularity
        if g == "block" and frames % self.block_frames:
            raise ValueError(f"{frames} frames are not whole blocks of {self.block_frames}")
        groups = frames // self.block_frames if g == "block" else {"frame": frames, "clip": 1}[g]
        idx = torch.randint(0, num_states, (batch_size, groups), device=device)
        return idx.repeat_interleave(frames // groups, dim=1)

    def loss(self, states: torch.Tensor, ts: torch.Tensor, x0: torch.Tensor, cond: Any,
             index: torch.Tensor) -> torch.Tensor:
        """``mean((x0_hat - x0)^2)`` with frame f of sample b taken from state ``index[b, f]``."""
        B, K, C, Fr, H, W = states.shape
        gather = index[:, None, None, :, None, None].expand(B, 1, C, Fr, H, W)
        x_t = torch.gather(states, 1, gather).squeeze(1)
        t = torch.gather(ts, 1, index)
        pred = self.adapter.predict_x0(self.bundle["student"], x_t, t, cond)
        return F.mse_loss(pred.float(), x0.float())

    def train_step(self, batch: Mapping[str, Any], step: int) -> Dict[str, float]:
        prepared = self.adapter.prepare_batch(batch, latents_source="data")
        states, ts = self.trajectory(batch, prepared)
        x0 = prepared.latents
        index = self.draw_indices(x0.shape[0], x0.shape[2], states.shape[1], x0.device)
        loss = self.loss(states, ts, x0, prepared.cond, index)
        return self.update("student", loss, step)

    def sampling_spec(self, num_steps: Optional[int] = None) -> SamplingSpec:
        """Few-step sampling along the step list (block by block for a block-causal student);
        ``num_steps`` is ignored."""
        return SamplingSpec(role="student", timesteps=tuple(float(t) for t in self.denoising_steps),
                            sampler="sde", causal=self.causal)

    def step_graph(self, step: int, num_microbatches: int) -> List[OpGraph]:
        """One phase: per microbatch ``student.denoise`` (forward, masked whole clip) and its backward."""
        return [single_role_graph(num_microbatches, "ode_init step")]
