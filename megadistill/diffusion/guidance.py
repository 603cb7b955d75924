"""Classifier-free guidance with an explicit scale convention.

Two conventions are in use and differ by one:

* ``"cfg"`` (standard, Wan / diffusers ``guidance_scale``): ``uncond + s (cond - uncond)``;
  ``s = 1`` is the conditional prediction alone.
* ``"dmd"`` (Self-Forcing / CausVid ``guidance_scale``): ``cond + g (cond - uncond)``;
  ``g = 0`` is the conditional prediction alone.

They agree when ``g = s - 1``: Self-Forcing's ``g = 3`` is standard CFG ``s = 4``.
The combination is linear, so it applies equally to velocity and x0 predictions.
"""
from __future__ import annotations

CONVENTIONS = ("cfg", "dmd")


def guided_prediction(cond, uncond, scale: float, convention: str):
    """Combine conditional and unconditional predictions under ``convention`` ("cfg" or "dmd")."""
    if convention == "cfg":
        return uncond + scale * (cond - uncond)
    if convention == "dmd":
        return cond + scale * (cond - uncond)
    raise ValueError(f"unknown guidance convention {convention!r}; expected one of {CONVENTIONS}")


def cfg_scale_from_dmd(g: float) -> float:
    """Standard CFG scale equal to DMD-convention guidance ``g``: ``s = g + 1``."""
    return g + 1.0


def dmd_scale_from_cfg(s: float) -> float:
    """DMD-convention guidance equal to standard CFG scale ``s``: ``g = s - 1``."""
    return s - 1.0
