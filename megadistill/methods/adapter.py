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

    def predict_flow_and_realism(self, handle: RoleHandle, x_t: torch.Tensor, t: torch.Tensor,
                                 cond: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(predict_flow(...), logits [B])`` from one forward: the flow and the network's realism
        classifier logits (DMD2's GAN discriminator; only networks built with one have it)."""
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


@runtime_checkable
class CausalAdapter(Adapter, Protocol):
    """The operations on a block-causal (self-forcing) network, on top of :class:`Adapter`.

    A block-causal network cuts a clip of F latent frames into blocks of ``frames_per_block``
    frames; a frame attends to its own block and to earlier ones. It runs two ways that compute
    the same function:

    * masked, whole clip: ``predict_flow(handle, x_t, t, cond)`` with per-frame timesteps
      ``t [B, F]`` (``[B]`` is broadcast);
    * cached, one block at a time: ``cache = new_cache(handle, batch, max_frames)``, then
      ``predict_flow_block(handle, x_block, t_block, cond, cache, start_frame)`` for
      ``start_frame = 0, n, 2n, ...``. Each call writes the block's keys into ``cache``; calling it
      again at the same ``start_frame`` replaces them (a cache refresh). Gradient never flows into
      earlier blocks through the cache.
    """

    def is_block_causal(self, handle: RoleHandle) -> bool:
        """Whether ``handle``'s network is block-causal (False: a bidirectional network)."""
        ...

    def frames_per_block(self, handle: RoleHandle) -> int:
        """Latent frames per causal block of ``handle``'s network (an error if it is not causal)."""
        ...

    def tokens_per_frame(self, handle: RoleHandle) -> int:
        """Attention tokens of one latent frame at the adapter's latent shape (for op costs)."""
        ...

    def new_cache(self, handle: RoleHandle, batch: int, max_frames: int) -> Any:
        """An empty, opaque KV cache for ``batch`` samples and up to ``max_frames`` frames (a network
        with a local attention window bounds its storage and accepts any length)."""
        ...

    def predict_flow_block(self, handle: RoleHandle, x_block: torch.Tensor, t_block: torch.Tensor, cond: Any,
                           cache: Any, start_frame: int) -> torch.Tensor:
        """Flow of one block ``[B, C, n, H, W]`` at absolute frame ``start_frame`` (``t_block`` ``[B]`` or
        ``[B, n]``), attending to the cache; writes the block into ``cache``."""
        ...

    def predict_x0_block(self, handle: RoleHandle, x_block: torch.Tensor, t_block: torch.Tensor, cond: Any,
                         cache: Any, start_frame: int) -> torch.Tensor:
        """``x_block - sigma * predict_flow_block(...)``."""
        ...
