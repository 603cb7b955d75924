"""The quality report of a DMD2 run on the synthetic world (docs/QUALITY.md).

Rows, on the same captions and starting noise: ``teacher_50`` (the teacher, 50 uniform steps of
the shifted schedule, Euler ODE, with the guidance DMD2 uses for its real score), ``teacher_4``
(the teacher, Euler ODE with that guidance on the student's step list), ``student_4`` (the
student, DMD few-step sampling on its step list, no guidance) and ``real`` clips; plus the noise
floor of FD at that set size. ``tools/bench_quality.py`` prints it after its run, and so does
``launch/pretrain_dmd.py`` at the end of a run with ``logging.quality_samples`` > 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

REPORT_KEYS = ("real", "teacher_50", "teacher_4", "student_4", "noise_floor_fd")


def student_step_list(cfg, scheduler) -> torch.Tensor:
    """The student's timesteps, as its method (``recipe.method``: dmd2 or self_forcing) derives
    them from ``method_config``."""
    from megadistill.diffusion import denoising_step_list
    from megadistill.methods.base import parse_method_config
    from megadistill.methods.dmd2 import DMD2Config
    from megadistill.methods.self_forcing import SelfForcingConfig

    configs = {"dmd2": DMD2Config, "self_forcing": SelfForcingConfig}
    method = cfg.recipe.method
    if method not in configs:
        raise ValueError(f"recipe.method {method!r} has no few-step student list; expected one of {sorted(configs)}")
    mc = parse_method_config(configs[method], cfg.method_config, method)
    shift = scheduler.shift if mc.flow_shift is None else mc.flow_shift
    return denoising_step_list(mc.denoising_steps, mc.warp_denoising_step, shift, scheduler.num_train_timesteps)


def student_weights(checkpoint) -> Path:
    """The student of a trainer checkpoint folder: its EMA weights when the run kept them."""
    checkpoint = Path(checkpoint)
    for name in ("ema_student.safetensors", "student.safetensors"):
        if (checkpoint / name).is_file():
            return checkpoint / name
    raise FileNotFoundError(f"{checkpoint} holds no student weights (student.safetensors); "
                            "pass a step_XXXXXXXX folder of a training run")


@torch.no_grad()
def student_full_state(handle) -> Dict[str, torch.Tensor]:
    """Collective (every rank calls it): the student role's weights at full shape, its EMA
    average when it keeps one, whether the role is a plain module or ZeRO-3 partitioned."""
    from megadistill.distributed.zero import gathered_state_dict

    if handle.ema is None:
        return gathered_state_dict(handle.module)
    if getattr(handle.ema, "partitioned", False):
        return handle.ema.full_state_dict()
    return handle.ema.state_dict()


def dmd2_quality_report(cfg, student, samples: int, teacher_steps: int = 50, batch_size: int = 64,
                        seed: int = 0, fd_inf: bool = False) -> Dict:
    """``{"real", "teacher_50", "teacher_4", "student_4", "noise_floor_fd"}`` of the DMD2 run
    ``cfg``, ``samples`` clips per set. ``student``: a trainer checkpoint folder of the run, or the
    student's full state dict (``student_full_state``). ``fd_inf``: also ``"fd_inf"``, every row's
    FD extrapolated to infinitely many clips (``megadistill.eval.frechet_distance_inf``)."""
    from megadistill.diffusion import sample_timesteps_uniform
    from megadistill.eval.quality import SamplingSpec, build_adapter, load_role_model, quality_report, world_of

    teacher = load_role_model(cfg, "teacher")
    if isinstance(student, dict):
        model = load_role_model(cfg, "student")
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in student.items()})
        student = model
    else:
        student = load_role_model(cfg, "student", student_weights(student))
    adapter = build_adapter(cfg, {"teacher": teacher, "student": student})
    sched = adapter.noise_scheduler
    steps = student_step_list(cfg, sched)
    uniform = sample_timesteps_uniform(teacher_steps, shift=sched.shift, num_train_timesteps=sched.num_train_timesteps)
    scale, convention = cfg.method_config.get("guidance_scale"), cfg.method_config.get("guidance_convention", "cfg")
    specs = [SamplingSpec("teacher_50", teacher, uniform, "ode", scale, convention),
             SamplingSpec("teacher_4", teacher, steps, "ode", scale, convention),
             SamplingSpec("student_4", student, steps, "sde")]
    report, _ = quality_report(specs, adapter, world_of(cfg), samples, seed, batch_size, fd_inf)
    return {k: report[k] for k in REPORT_KEYS + (("fd_inf",) if fd_inf else ())}


def quality_bar(report: Dict, fd: Optional[Dict[str, float]] = None) -> Dict[str, bool]:
    """The bar of docs/QUALITY.md: each condition and whether it holds. ``fd``: the FD of each row
    to judge by (e.g. ``report["fd_inf"]``); the rows' own ``fd`` by default."""
    s, t50, t4 = report["student_4"], report["teacher_50"], report["teacher_4"]
    fd = fd or {name: report[name]["fd"] for name in ("student_4", "teacher_50", "teacher_4")}
    return {"student_fd <= 1.1 x teacher_50_fd": fd["student_4"] <= 1.1 * fd["teacher_50"],
            "student_fd <= 0.3 x teacher_4_fd": fd["student_4"] <= 0.3 * fd["teacher_4"],
            "student_adherence >= teacher_50_adherence - 0.02": s["adherence"] >= t50["adherence"] - 0.02}


__all__ = ["REPORT_KEYS", "student_step_list", "student_weights", "student_full_state", "dmd2_quality_report",
           "quality_bar"]
