"""Model-agnostic flow-matching math: schedule, timestep lists, guidance, samplers."""
from .guidance import CONVENTIONS, cfg_scale_from_dmd, dmd_scale_from_cfg, guided_prediction
from .samplers import ode_sample, sde_sample
from .scheduler import FlowMatchScheduler, shift_sigma, unshift_sigma
from .timesteps import denoising_step_list, sample_dmd_timesteps, sample_timesteps_uniform

__all__ = [
    "CONVENTIONS", "FlowMatchScheduler", "cfg_scale_from_dmd", "denoising_step_list",
    "dmd_scale_from_cfg", "guided_prediction", "ode_sample", "sample_dmd_timesteps",
    "sample_timesteps_uniform", "sde_sample", "shift_sigma", "unshift_sigma",
]
