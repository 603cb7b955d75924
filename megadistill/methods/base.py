"""What every training method is: roles in, a training step out, plus its op graph.

A method owns the algorithm -- losses, rollout policy, timestep sampling, update schedule -- and
nothing else. It reaches networks only through ``bundle`` (roles) and ``adapter`` (operations,
see ``adapter.py``); it never imports a model family.

``train_step(batch, step)`` runs one optimizer step of the method on a raw loader batch (the
trainer's path for pipeline size 1). ``step_graph(step, num_microbatches)`` describes the same
step as model calls for the pipeline schedule engine: a list of phases, each an
``megadistill.pipeline.graph.OpGraph``; after a phase's last backward the optimizer step of each
of the phase's trainable roles runs, before the next phase starts.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch.nn.functional as F

from megadistill.config import ConfigError
from megadistill.pipeline.graph import OpGraph

from .adapter import Adapter
from .roles import ModelBundle


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How a method's trained role generates (validation, ``launch/sample.py``): the role, its
    timestep list (descending, ending above 0; the sampler finishes at 0), the sampler kind
    (``ode``: Euler on the flow; ``sde``: predict x0 and re-noise, DMD's few-step sampler) and
    optional classifier-free guidance with its explicit convention.

    ``causal``: the role is block-causal and samples block by block with a KV cache: each block
    runs the whole step list (``sde``), then the block's clean output, re-noised to
    ``context_timestep`` (0: clean), is run once more to write its cache before the next block."""

    role: str
    timesteps: tuple
    sampler: str
    guidance_scale: Optional[float] = None
    guidance_convention: Optional[str] = None
    causal: bool = False
    context_timestep: float = 0.0


class TrainingMethod(abc.ABC):
    """Base of all methods. Subclasses set ``name`` and ``roles`` (role -> trainable)."""

    name: str = ""
    roles: Dict[str, bool] = {}

    def __init__(self, bundle: ModelBundle, adapter: Adapter, method_config: Optional[Mapping[str, Any]] = None):
        if not self.name or not self.roles:
            raise TypeError(f"{type(self).__name__} must set name and roles")
        bundle.require_roles(self.roles, method=f"method {self.name!r}", trainable=self.roles)
        self.bundle = bundle
        self.adapter = adapter

    @abc.abstractmethod
    def train_step(self, batch: Mapping[str, Any], step: int) -> Dict[str, float]:
        """One optimizer step on a raw batch; returns scalar logs."""

    @abc.abstractmethod
    def step_graph(self, step: int, num_microbatches: int) -> List[OpGraph]:
        """The model calls of ``train_step(·, step)`` per microbatch, as ordered phases."""

    def update(self, role: str, loss, step: int) -> Dict[str, float]:
        """Backward of ``loss`` into ``role`` and its optimizer step; logs ``loss`` and, where the
        role reports one, ``grad_norm``."""
        handle = self.bundle[role]
        self.adapter.backward(handle, loss)
        logs = {"loss": loss.item()}
        norm = handle.step(step)
        if norm is not None:  # an engine without a global norm reports none
            logs["grad_norm"] = norm
        return logs

    @abc.abstractmethod
    def sampling_spec(self, num_steps: Optional[int] = None) -> SamplingSpec:
        """How the trained role samples; ``num_steps`` overrides the method's own step count where
        the method has no fixed step list."""


# -- method_config parsing -------------------------------------------------------------------------

def config_error(method: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"method_config of {method}", f"method_config.{key}", problem)


def parse_method_config(cls, raw: Optional[Mapping[str, Any]], method: str):
    """Build the frozen dataclass ``cls`` from a ``method_config`` mapping.

    Unknown keys are rejected by name (with the list of known keys); missing keys keep the
    dataclass defaults. Value checks live in ``cls.__post_init__``.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"method_config of {method}", "method_config",
                          f"must be a mapping of keys to values, got {type(raw).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in known:
            raise config_error(method, str(key), f"unknown key for method {method}; known keys: {known}")
    return cls(**dict(raw))


def require_int(method: str, key: str, value, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise config_error(method, key, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise config_error(method, key, f"must be >= {minimum}, got {value}")
    return value


def require_number(method: str, key: str, value, low: Optional[float] = None, high: Optional[float] = None,
                   positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise config_error(method, key, f"must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise config_error(method, key, f"must be > 0, got {value}")
    if low is not None and value < low or high is not None and value > high:
        raise config_error(method, key, f"must lie in [{low}, {high}], got {value}")
    return float(value)


def require_bool(method: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise config_error(method, key, f"must be true or false, got {value!r}")
    return value


def require_choice(method: str, key: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise config_error(method, key, f"must be one of {list(choices)}, got {value!r}")
    return value


# -- pieces shared by methods ----------------------------------------------------------------------

def flow_matching_loss(v_pred, x0, eps):
    """``mean((v_pred - (eps - x0))^2)`` in float32: the flow-matching (rectified-flow) loss for
    ``x_t = (1 - sigma) x0 + sigma eps``, whose velocity is ``eps - x0``."""
    target = eps.float() - x0.float()
    return F.mse_loss(v_pred.float(), target)


def derive_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (ints/strings) that every process computes identically
    (sha256 of their text; Python's ``hash`` of a string differs between processes)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
