"""The adapter protocol: the operations a method may perform on models of any family.

An adapter is written once per model family (``megadistill/models/<family>/adapter.py``) and
speaks of operations only -- predict, noise, encode, prepare, backward -- never of methods
(no "teacher", "critic" or "DMD" here). Methods receive :class:`RoleHandle` objects from the
bundle and pass them to the adapter; the adapter runs the handle's network with
``handle(*inputs)`` and backpropagates with ``handle.backward(loss)``. A family implements the
protocol structurally: it does not import this package (a model family imports no method).

Conventions shared by every adapter (flow matching, see ``megadistill.diffusion.scheduler``):

* timesteps ``t`` are on the shifted scale ``t = T * sigma``: a tensor ``[B]`` (one per sample)
  or ``[B, F]`` (one per latent frame), float64 by convention;
* ``x_t = (1 - sigma) x0 + sigma eps``; a network predicts the flow ``v = eps - x0``;
  ``x0 = x_t - sigma v``;
* conditioning (``cond``) is an opaque object produced by the adapter and only ever handed back
  to it; methods never look inside.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, Tuple, runtime_checkable

import torch

from megadistill.diffusion import FlowMatchScheduler

from .roles import RoleHandle

LATENT_SOURCES = ("zeros", "data")


class PreparedBatch(Protocol):
    """A training batch in the form methods use (each adapter has its own class with these
    attributes; model families do not import the methods package).

    ``latents``: the data latents ``[B, C, F, H, W]`` (``latents_source="data"``) or zeros of
    that shape (``"zeros"``: data-free methods use them for shape, dtype and device only).
    ``cond``: opaque conditioning of the batch's prompts. ``uncond``: opaque negative
    conditioning when the batch carried its own, else None (see ``Adapter.negative_cond``).
    """

    latents: torch.Tensor
    cond: Any
    latents_source: str
    uncond: Any

    @property
    def batch_size(self) -> int:
        ...


@runtime_checkable
class Adapter(Protocol):
    """Operations on one model family. See the module docstring for the conventions."""

    noise_scheduler: FlowMatchScheduler

    def predict_flow(self, handle: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The network's flow prediction ``v`` at ``(x_t, t)``, in ``x_t``'s dtype."""
        ...

    def predict_x0(self, handle: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """``x_t - sigma * predict_flow(...)``, in ``x_t``'s dtype."""
        ...

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) x0 + sigma eps`` with ``sigma = t / T``."""
        ...

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Conditioning of a list of prompts."""
        ...

    def negative_cond(self, batch: PreparedBatch) -> Any:
        """Unconditional conditioning (empty / negative prompt) for every sample of ``batch``."""
        ...

    def where_cond(self, mask: torch.Tensor, cond: Any, other: Any) -> Any:
        """Per-sample choice: sample ``b`` takes ``cond`` where ``mask[b]`` is true, else ``other``."""
        ...

    def latent_shape(self, raw_batch: Mapping[str, Any]) -> Tuple[int, ...]:
        """Shape ``[B, C, F, H, W]`` of the latents of a raw batch."""
        ...

    def prepare_batch(self, raw_batch: Mapping[str, Any], latents_source: str = "zeros") -> PreparedBatch:
        """Raw loader batch -> :class:`PreparedBatch` on the compute device.

        ``latents_source="data"`` requires data latents in the raw batch; ``"zeros"`` fills the
        latents with zeros of :meth:`latent_shape`.
        """
        ...

    def backward(self, handle: RoleHandle, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` into ``handle``'s network (through its engine when it has one,
        inside whatever context the family needs for recomputed forwards)."""
        ...
