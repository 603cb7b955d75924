"""Sample-quality benchmark of text-to-video latent generators on the synthetic world.

A generator is reached through its family's adapter (``predict_flow(model, x_t, t, cond) -> v``,
``prepare_batch`` / ``negative_cond`` for the text), so any family and any role can be measured.
Two samplers, both from the same starting noise and captions:

* ``"ode"``: Euler on the flow (``megadistill.diffusion.ode_sample``), optionally with
  classifier-free guidance ``v = guided_prediction(v_cond, v_uncond, scale, convention)``: how a
  teacher samples, on 50 uniform steps of the shifted schedule or on a few-step list;
* ``"sde"``: DMD few-step sampling (``sde_sample``): predict x0, re-noise it to the next step with
  fresh noise; normally without guidance (a distilled student has it baked in).

Each set of generated clips is scored with ``megadistill.eval.evaluate`` against an independent
set of real clips of the same size (FD is only comparable at equal set sizes). Sample ``i``
starts from noise that depends on ``(seed, i)`` only, never on the batch it is generated in;
the SDE re-noising draws come from one generator per batch seeded by ``(seed, first index)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megadistill.data.synthetic import SyntheticVideoWorld, mix_seed, sample_captions
from megadistill.diffusion import CONVENTIONS, FlowMatchScheduler, guided_prediction, ode_sample, sde_sample
from megadistill.eval.features import feature_extractor
from megadistill.eval.metrics import evaluate, frechet_distance_inf, noise_floor_fd
from megadistill.models.registry import get_family

SAMPLERS = ("ode", "sde")
METRIC_KEYS = ("fd", "adherence", "temporal_error")


# -- models and world of a run config ---------------------------------------------------------------

def load_role_model(cfg, role: str, weights: Optional[str] = None, device="cpu"):
    """The network of ``role`` as the run config builds it (``path`` or ``preset``), in eval mode.

    ``weights``: a ``.safetensors`` state dict written by the trainer (``<role>.safetensors`` or
    ``ema_<role>.safetensors`` of a checkpoint) loaded over it; every key must match.
    """
    if role not in cfg.models:
        raise ValueError(f"the run config has no role {role!r} (roles: {sorted(cfg.models)})")
    family = get_family(cfg.recipe.family)
    model = family.build_model(cfg.models[role], cfg, seed=cfg.training.seed)
    if weights is not None:
        from safetensors.torch import load_file

        state = load_file(str(weights))
        expected = set(model.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{weights} does not fit role {role!r}: missing {missing[:5]}, "
                             f"unexpected {extra[:5]} (was it written for another model shape?)")
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
    return model.to(device).eval().requires_grad_(False)


def build_adapter(cfg, models: Dict[str, Any], device="cpu"):
    """The family adapter of the run config (text encoder, scheduler with the run's flow shift)."""
    return get_family(cfg.recipe.family).build_adapter(cfg, torch.device(device), models)


def world_of(cfg) -> SyntheticVideoWorld:
    """The synthetic world a run with ``data.kind: synthetic`` trains on."""
    if cfg.data.kind != "synthetic":
        raise ValueError(f"data.kind is {cfg.data.kind!r}; the quality benchmark needs 'synthetic'")
    return get_family(cfg.recipe.family).build_synthetic_stream(cfg, rank=0, world_size=1).world


# -- evaluation data and sampling ---------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSet:
    """Captions, real clips showing them (``real``) and an independent real reference set."""

    captions: List[str]
    real: torch.Tensor
    reference: torch.Tensor


def eval_set(world: SyntheticVideoWorld, num_samples: int, seed: int) -> EvalSet:
    """``num_samples`` random captions with real clips for them, and a separate real reference set
    of the same size (its own captions) that every generated set is compared with."""
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples}: FD needs at least 2 samples per set")
    g = torch.Generator().manual_seed(mix_seed("quality-captions", seed))
    captions = sample_captions(num_samples, g)
    real, _ = world.sample_for_captions(captions, torch.Generator().manual_seed(mix_seed("quality-real", seed)))
    reference = world.sample(num_samples, torch.Generator().manual_seed(mix_seed("quality-ref", seed)))[0]
    return EvalSet(captions=captions, real=real, reference=reference)


def start_noise(index: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Starting noise of sample ``index``: a function of ``(seed, index)`` only."""
    g = torch.Generator().manual_seed(mix_seed("quality-noise", seed, int(index)))
    return torch.randn(tuple(shape), generator=g)


@torch.no_grad()
def generate(model, adapter, captions: Sequence[str], timesteps: torch.Tensor, sampler: str,
             latent_shape: Sequence[int], seed: int, guidance_scale: Optional[float] = None,
             guidance_convention: str = "cfg", batch_size: int = 64) -> torch.Tensor:
    """Clips ``[N, C, F, H, W]`` (float32, CPU) of ``model`` for ``captions``.

    ``sampler``: "ode" (Euler) or "sde" (DMD few-step). ``guidance_scale``: None for the
    conditional prediction alone, else CFG under ``guidance_convention`` ("cfg" or "dmd").
    ``adapter``: the family's adapter (``prepare_batch``, ``negative_cond``, ``predict_flow``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: choose one of {SAMPLERS}")
    if guidance_convention not in CONVENTIONS:
        raise ValueError(f"guidance_convention {guidance_convention!r}: choose one of {CONVENTIONS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    scheduler: FlowMatchScheduler = adapter.noise_scheduler
    out = []
    for start in range(0, len(captions), batch_size):
        batch = adapter.prepare_batch({"prompts": list(captions[start:start + batch_size])}, "zeros")
        device = batch.latents.device
        noise = torch.stack([start_noise(start + i, latent_shape, seed)
                             for i in range(batch.batch_size)]).to(device)
        uncond = adapter.negative_cond(batch) if guidance_scale is not None else None
        predict = _flow_fn(model, adapter, batch.cond, uncond, guidance_scale, guidance_convention)
        if sampler == "ode":
            x = ode_sample(predict, noise, timesteps, scheduler)
        else:
            g = torch.Generator(device=device).manual_seed(mix_seed("quality-sde", seed, start))
            x = sde_sample(predict, noise, timesteps, scheduler, generator=g)
        out.append(x.float().cpu())
    return torch.cat(out)


def _flow_fn(model, adapter, cond, uncond, scale: Optional[float], convention: str) -> Callable:
    def predict(x, t):
        v = adapter.predict_flow(model, x, t, cond)
        if uncond is None:
            return v
        return guided_prediction(v, adapter.predict_flow(model, x, t, uncond), scale, convention)
    return predict


def score(generated: torch.Tensor, data: EvalSet, world: SyntheticVideoWorld) -> Dict[str, float]:
    """``{"fd", "adherence", "temporal_error"}`` of clips generated for ``data.captions``."""
    return evaluate(generated, data.captions, data.reference, world)


@dataclass(frozen=True)
class SamplingSpec:
    """One row of the benchmark: which model, on which timesteps, with which sampler/guidance."""

    name: str
    model: Any
    timesteps: torch.Tensor
    sampler: str
    guidance_scale: Optional[float] = None
    guidance_convention: str = "cfg"


def fd_inf_min_samples(world: SyntheticVideoWorld) -> int:
    """The fewest clips per set with which ``quality_report(..., fd_inf=True)`` can extrapolate FD
    (its smallest subsets, half the set, must be wider than the features)."""
    return 2 * len(feature_extractor(world).feature_names) + 2


def quality_report(specs: Sequence[SamplingSpec], adapter, world: SyntheticVideoWorld, num_samples: int,
                   seed: int, batch_size: int = 64, fd_inf: bool = False
                   ) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``({"real": metrics, <spec.name>: metrics, ..., "noise_floor_fd": x}, {name: clips})``.

    ``real`` scores real clips of the evaluation captions (the best any generator can do);
    ``noise_floor_fd`` is the FD between two independent real sets of ``num_samples`` clips.
    ``fd_inf``: also ``"fd_inf": {"real": x, <spec.name>: x, ...}``, each set's FD against the
    same reference extrapolated to infinitely many clips (``frechet_distance_inf``; needs more
    than twice as many clips as features).
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or "real" in names or "noise_floor_fd" in names:
        raise ValueError(f"spec names {names} must be distinct and not 'real' / 'noise_floor_fd'")
    if fd_inf and num_samples < fd_inf_min_samples(world):
        raise ValueError(f"fd_inf needs at least {fd_inf_min_samples(world)} clips per set, got {num_samples}")
    data = eval_set(world, num_samples, seed)
    report: Dict[str, Any] = {"real": score(data.real, data, world)}
    clips = {}
    for s in specs:
        clips[s.name] = generate(s.model, adapter, data.captions, s.timesteps, s.sampler, world.latent_shape,
                                 seed, s.guidance_scale, s.guidance_convention, batch_size)
        report[s.name] = score(clips[s.name], data, world)
    report["noise_floor_fd"] = noise_floor_fd(world, num_samples, seed)
    if fd_inf:
        extractor = feature_extractor(world)
        reference = extractor(data.reference)
        sets = {"real": data.real, **clips}
        report["fd_inf"] = {name: frechet_distance_inf(extractor(x), reference, seed=seed) for name, x in sets.items()}
    return report, clips
