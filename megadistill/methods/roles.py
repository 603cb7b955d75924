"""Roles: the models a method works with, each reached by name (student / teacher / critic).

A :class:`RoleHandle` holds one role's network and everything that updates it. It hides whether
the network is a plain ``nn.Module`` with a torch optimizer, or a DeepSpeed engine (ZeRO-3),
whose ``backward(loss)`` and ``step()`` must be used instead of ``loss.backward()`` and
``optimizer.step()``:

    handle(x, t, text)        forward through the engine when there is one, else the module
    handle.backward(loss)     engine.backward(loss)  |  loss.backward()
    handle.step(step)         engine.step()          |  clip -> optimizer.step -> lr_scheduler.step
                                                         -> zero_grad
                              then the EMA update (if the role keeps one)

A :class:`ModelBundle` maps role names to handles; a method asks for the roles it needs with
:meth:`ModelBundle.require_roles`. :class:`EMA` keeps a float32 exponential moving average of a
module's parameters.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn


class RoleError(ValueError):
    """A bundle lacks a role a method needs, or a role is set up wrongly for its use."""


class EMA:
    """Exponential moving average of a module's parameters, kept in float32.

    ``update(step)``: for ``step < start_step`` the shadow is a copy of the parameters; from
    ``start_step`` on, ``shadow <- decay * shadow + (1 - decay) * param``. So at ``start_step``
    the average starts from the weights of the previous update, as when the public Self-Forcing
    trainer creates its EMA at ``ema_start_step``.

    The shadow covers every parameter of the module (frozen ones too, so :meth:`copy_to` gives a
    complete model). Under ZeRO-3 a module's parameters are partitioned; an EMA of such a module
    must be built over the gathered weights by the trainer, not here.
    """

    def __init__(self, module: nn.Module, decay: float, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        if int(start_step) != start_step or start_step < 0:
            raise ValueError(f"EMA start_step must be an integer >= 0, got {start_step!r}")
        self.module = module
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32).clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        params = dict(self.module.named_parameters())
        if params.keys() != self.shadow.keys():
            raise RoleError("EMA: the module's parameters changed since the EMA was built")
        copy = step < self.start_step
        for name, p in params.items():
            value = p.detach().to(torch.float32)
            if copy:
                self.shadow[name].copy_(value)
            else:
                self.shadow[name].lerp_(value, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: Optional[nn.Module] = None) -> None:
        """Write the averaged weights into ``module`` (default: the tracked module)."""
        module = self.module if module is None else module
        for name, p in module.named_parameters():
            if name not in self.shadow:
                raise RoleError(f"EMA: parameter {name!r} has no average")
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged parameters by name (float32 tensors; safetensors-friendly)."""
        return {name: t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = sorted(self.shadow.keys() - state.keys())
        unexpected = sorted(state.keys() - self.shadow.keys())
        if missing or unexpected:
            raise RoleError(f"EMA state does not match the module: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
        for name, t in state.items():
            if tuple(t.shape) != tuple(self.shadow[name].shape):
                raise RoleError(f"EMA state {name!r} has shape {tuple(t.shape)}, "
                                f"expected {tuple(self.shadow[name].shape)}")
        for name, t in state.items():
            self.shadow[name].copy_(t.to(torch.float32))


@dataclass
class RoleHandle:
    """One role's network and its update machinery.

    Either give ``module`` (+ ``optimizer``, optional ``lr_scheduler`` and ``grad_clip``), or an
    ``engine`` (a DeepSpeed engine, which owns optimizer, scheduler, clipping and ZeRO state;
    ``module`` is then the engine's inner module, taken from ``engine.module`` when omitted).

    A frozen role (``trainable=False``) has its parameters set to ``requires_grad=False`` and
    refuses ``backward``/``step``. ``grad_clip`` (plain modules only): max global grad-norm; None
    or 0 disables clipping (the norm is still computed and returned for logging).
    """

    name: str
    module: Optional[nn.Module]
    trainable: bool
    optimizer: Optional[torch.optim.Optimizer] = None
    lr_scheduler: Optional[Any] = None
    ema: Optional[EMA] = None
    grad_clip: Optional[float] = None
    engine: Optional[Any] = None

    def __post_init__(self):
        if self.engine is not None:
            if self.module is None:
                self.module = self.engine.module
            if self.optimizer is not None or self.lr_scheduler is not None:
                raise RoleError(f"role {self.name!r}: with a DeepSpeed engine the optimizer and lr "
                                "scheduler belong to the engine; do not pass them to the handle")
            if self.grad_clip:
                raise RoleError(f"role {self.name!r}: with a DeepSpeed engine set gradient_clipping in "
                                "the DeepSpeed config, not grad_clip on the handle")
        if self.module is None:
            raise RoleError(f"role {self.name!r}: give a module or an engine")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise RoleError(f"role {self.name!r}: grad_clip must be >= 0, got {self.grad_clip}")
        if not self.trainable:
            if self.optimizer is not None or self.engine is not None and _engine_has_optimizer(self.engine):
                raise RoleError(f"role {self.name!r} is frozen (trainable=False) but has an optimizer")
            self.module.requires_grad_(False)

    # -- forward -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        net = self.engine if self.engine is not None else self.module
        return net(*args, **kwargs)

    @contextlib.contextmanager
    def frozen(self):
        """Inside the block this role's parameters require no gradient, so a loss of ANOTHER role
        can backpropagate through this network to its input without leaving gradients in it (they
        would be added to this role's next update)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for p in params:
                p.requires_grad_(True)

    def parameters(self) -> Iterable[nn.Parameter]:
        return self.module.parameters()

    # -- update --------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss``; a loss that is non-finite on any rank skips backward and the next
        :meth:`step` on every rank (ranks must agree: a ZeRO step is collective)."""
        self._check_trainable("backward")
        self._skip_step = not _finite_on_all_ranks(loss)
        if self._skip_step:
            return
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self, global_step: Optional[int] = None) -> Optional[float]:
        """Apply the accumulated gradients; returns the global grad norm before clipping.

        Plain module: clip (if ``grad_clip``), ``optimizer.step()``, ``lr_scheduler.step()``,
        ``optimizer.zero_grad(set_to_none=True)``. A non-finite norm skips the optimizer and
        scheduler step (the gradients are dropped) -- the caller sees the norm and decides whether
        to abort. The norm is over this process's gradients; under tensor/pipeline parallelism
        use an engine (or reduce the norm across the model-parallel group) instead.
        Engine: ``engine.step()``; the norm is ``engine.get_global_grad_norm()``, or None where
        the engine does not compute one (DeepSpeed without ZeRO or mixed precision).
        Then the EMA (if any) is updated with ``global_step``.
        """
        self._check_trainable("step")
        if getattr(self, "_skip_step", False):
            self._skip_step = False
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = None if norm is None else float(norm)
        else:
            if self.optimizer is None:
                raise RoleError(f"role {self.name!r} is trainable but has no optimizer")
            params = [p for p in self.module.parameters() if p.grad is not None]
            max_norm = self.grad_clip if self.grad_clip else math.inf
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
            if math.isfinite(norm):
                self.optimizer.step()
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            if global_step is None:
                raise RoleError(f"role {self.name!r} keeps an EMA: pass global_step to step()")
            self.ema.update(global_step)
        return norm

    def _check_trainable(self, what: str) -> None:
        if not self.trainable:
            raise RoleError(f"role {self.name!r} is frozen (trainable=False); {what}() is not allowed")


def _finite_on_all_ranks(loss: torch.Tensor) -> bool:
    import torch.distributed as dist

    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=loss.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def _engine_has_optimizer(engine) -> bool:
    """A frozen role under ZeRO-3 is an engine without a client optimizer: DeepSpeed then holds a
    parameter-partitioning object (``DeepSpeedZeRoOffload``) in ``engine.optimizer``, which gathers
    weights layer by layer for forward but updates nothing."""
    opt = getattr(engine, "optimizer", None)
    return opt is not None and type(opt).__name__ != "DeepSpeedZeRoOffload"


class ModelBundle:
    """The roles of one run by name (``bundle["student"]``)."""

    def __init__(self, roles: Dict[str, RoleHandle]):
        for key, handle in roles.items():
            if not isinstance(handle, RoleHandle):
                raise RoleError(f"bundle role {key!r} must be a RoleHandle, got {type(handle).__name__}")
            if handle.name != key:
                raise RoleError(f"bundle role {key!r} holds a handle named {handle.name!r}")
        self.roles = dict(roles)

    def __getitem__(self, name: str) -> RoleHandle:
        if name not in self.roles:
            raise RoleError(f"no role {name!r} in the bundle (it has {sorted(self.roles)})")
        return self.roles[name]

    def __contains__(self, name: str) -> bool:
        return name in self.roles

    def get(self, name: str) -> Optional[RoleHandle]:
        return self.roles.get(name)

    @property
    def trainable_roles(self) -> tuple:
        return tuple(n for n, h in self.roles.items() if h.trainable)

    def require_roles(self, names: Iterable[str], method: str = "this method",
                      trainable: Optional[Dict[str, bool]] = None) -> None:
        """Raise :class:`RoleError` unless every role in ``names`` is present (and, for the roles
        in ``trainable``, trainable or frozen as given)."""
        names = list(names)
        missing = [n for n in names if n not in self.roles]
        if missing:
            raise RoleError(f"{method} needs roles {names} but the bundle has {sorted(self.roles)}; "
                            f"add {', '.join('models.' + n for n in missing)} to the config")
        for name, want in (trainable or {}).items():
            if self.roles[name].trainable != want:
                raise RoleError(f"{method}: role {name!r} must be {'trainable' if want else 'frozen'}; "
                                f"set models.{name}.trainable: {str(want).lower()}")
