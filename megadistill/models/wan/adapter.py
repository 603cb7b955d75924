"""Wan implementation of the adapter protocol (``megadistill/methods/adapter.py``).

The only place that knows how a Wan DiT is called: ``dit(latents [B,16,F,H,W], timestep [B] or
[B,F], text_states [B,L,text_dim]) -> flow``. The protocol is implemented structurally; this
module imports nothing from the methods package.

Conditioning is a dict ``{"text_states": [B, L, text_dim]}``. Text comes precomputed in the raw
batch (``batch["text_states"]``) or as ``batch["prompts"]`` encoded by the text encoder. Text
shorter than the DiT's ``text_len`` is zero-padded by the DiT; :meth:`WanAdapter.where_cond`
pads to a common length the same way, which leaves the prediction unchanged.

The unconditional text (``negative_cond``), in order of preference: the batch's own
``negative_text_states``; the adapter's ``negative_text_states``; the encoding of
``negative_prompt`` (default "", the empty prompt) by the text encoder, computed once.

Raw batch keys: ``text_states`` or ``prompts``; optional ``negative_text_states``
(``[B, L, D]`` or one ``[L, D]`` / ``[1, L, D]`` for all), ``latents`` ``[B, C, F, H, W]`` (needed
for ``latents_source="data"``), ``latent_shape`` ``(C, F, H, W)`` (overrides the adapter's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megadistill.diffusion import FlowMatchScheduler

LATENT_SOURCES = ("zeros", "data")


@dataclass
class WanBatch:
    """A prepared batch: latents (data or zeros) and text conditioning (see the module doc)."""

    latents: torch.Tensor
    cond: Dict[str, torch.Tensor]
    latents_source: str
    uncond: Optional[Dict[str, torch.Tensor]] = None

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])


class WanAdapter:
    """Operations on Wan DiTs (``WanDiT`` or a DeepSpeed engine around one, held by a role handle).

    Args:
        text_encoder: a ``WanTextEncoder`` (or anything with ``encode(prompts) -> (states, lens)``);
            None when batches carry ``text_states``.
        scheduler: the ``FlowMatchScheduler`` of the run (its ``shift`` is the run's flow shift).
        latent_shape: ``(C, F, H, W)`` of one sample's latents, used when a batch has no latents.
        negative_prompt: the prompt whose encoding is the unconditional text (default: empty).
        negative_text_states: precomputed unconditional text ``[L, D]`` or ``[1, L, D]``.
        device: where batches are moved (None: leave tensors where they are).
        latent_dtype: dtype of the latents methods work in (float32; the DiT casts to its own).
    """

    def __init__(self, text_encoder=None, scheduler: Optional[FlowMatchScheduler] = None, *,
                 latent_shape: Optional[Sequence[int]] = None, negative_prompt: str = "",
                 negative_text_states: Optional[torch.Tensor] = None, device=None,
                 latent_dtype: torch.dtype = torch.float32):
        if not isinstance(scheduler, FlowMatchScheduler):
            raise TypeError("WanAdapter needs scheduler=FlowMatchScheduler(num_train_timesteps, shift), "
                            f"got {type(scheduler).__name__}")
        if latent_shape is not None and (len(latent_shape) != 4 or min(latent_shape) < 1):
            raise ValueError(f"WanAdapter: latent_shape must be (C, F, H, W), got {tuple(latent_shape)}")
        self.text_encoder = text_encoder
        self.noise_scheduler = scheduler
        self.default_latent_shape = None if latent_shape is None else tuple(int(s) for s in latent_shape)
        self.negative_prompt = negative_prompt
        self.device = None if device is None else torch.device(device)
        self.latent_dtype = latent_dtype
        self._negative_states = None if negative_text_states is None else _one_text(negative_text_states)

    # -- model calls ------------------------------------------------------------------------------
    def predict_flow(self, handle, x_t: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]):
        v = handle(x_t, t, cond["text_states"])
        if v.shape != x_t.shape:
            raise ValueError(f"Wan DiT returned shape {tuple(v.shape)} for latents {tuple(x_t.shape)}")
        return v.to(x_t.dtype)

    def predict_x0(self, handle, x_t: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]):
        return self.noise_scheduler.x0_from_flow(x_t, self.predict_flow(handle, x_t, t, cond), t)

    def predict_flow_and_realism(self, handle, x_t: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]):
        v, logits = handle(x_t, t, cond["text_states"], return_realism=True)
        if v.shape != x_t.shape or logits.shape != x_t.shape[:1]:
            raise ValueError(f"Wan DiT returned shapes {tuple(v.shape)}, {tuple(logits.shape)} for latents "
                             f"{tuple(x_t.shape)}")
        return v.to(x_t.dtype), logits

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, eps, t)

    # -- block-causal networks (CausalWanDiT): the CausalAdapter operations -------------------------
    def is_block_causal(self, handle) -> bool:
        return _is_causal(handle)

    def frames_per_block(self, handle) -> int:
        return _causal_module(handle).num_frame_per_block

    def tokens_per_frame(self, handle) -> int:
        if self.default_latent_shape is None:
            raise ValueError("WanAdapter.tokens_per_frame needs the adapter's latent_shape=(C, F, H, W)")
        _, ph, pw = _causal_module(handle).config.patch_size
        _, _, h, w = self.default_latent_shape
        return (h // ph) * (w // pw)

    def new_cache(self, handle, batch: int, max_frames: int):
        return _causal_module(handle).new_cache(batch, max_frames)

    def predict_flow_block(self, handle, x_block: torch.Tensor, t_block: torch.Tensor,
                           cond: Dict[str, torch.Tensor], cache, start_frame: int) -> torch.Tensor:
        v = _call_block(handle, x_block, t_block, cond["text_states"], cache, start_frame)
        if v.shape != x_block.shape:
            raise ValueError(f"causal Wan DiT returned shape {tuple(v.shape)} for a block {tuple(x_block.shape)}")
        return v.to(x_block.dtype)

    def predict_x0_block(self, handle, x_block: torch.Tensor, t_block: torch.Tensor,
                         cond: Dict[str, torch.Tensor], cache, start_frame: int) -> torch.Tensor:
        v = self.predict_flow_block(handle, x_block, t_block, cond, cache, start_frame)
        return self.noise_scheduler.x0_from_flow(x_block, v, t_block)

    def backward(self, handle, loss: torch.Tensor) -> None:
        # Wan needs no forward context for recomputed (checkpointed) forwards: plain backward.
        handle.backward(loss)

    # -- conditioning -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        if self.text_encoder is None:
            raise ValueError("WanAdapter has no text encoder: put precomputed text_states in the batch "
                             "or build the adapter with text_encoder=")
        states, _ = self.text_encoder.encode(list(prompts))
        return {"text_states": self._to_device(states)}

    def negative_cond(self, batch: WanBatch) -> Dict[str, torch.Tensor]:
        if batch.uncond is not None:
            return batch.uncond
        if self._negative_states is None:
            if self.text_encoder is None:
                raise ValueError("WanAdapter cannot build the unconditional text: the batch has no "
                                 "negative_text_states, the adapter none either, and there is no text "
                                 "encoder to encode negative_prompt")
            self._negative_states = self.encode_prompts([self.negative_prompt])["text_states"]
        text = batch.cond["text_states"]
        states = self._negative_states.to(device=text.device)
        return {"text_states": states.expand(batch.batch_size, -1, -1)}

    def where_cond(self, mask: torch.Tensor, cond: Dict[str, torch.Tensor],
                   other: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        a, b = cond["text_states"], other["text_states"]
        if a.shape[0] != mask.shape[0] or b.shape[0] != mask.shape[0]:
            raise ValueError(f"where_cond: mask of {mask.shape[0]} samples, "
                             f"texts of {a.shape[0]} and {b.shape[0]}")
        n = max(a.shape[1], b.shape[1])  # zero padding is what the DiT itself adds
        a, b = F.pad(a, (0, 0, 0, n - a.shape[1])), F.pad(b, (0, 0, 0, n - b.shape[1]))
        return {"text_states": torch.where(mask.to(a.device)[:, None, None], a, b.to(a.dtype))}

    # -- batches ----------------------------------------------------------------------------------
    def latent_shape(self, raw_batch: Mapping[str, Any]) -> Tuple[int, ...]:
        if "latents" in raw_batch:
            return tuple(raw_batch["latents"].shape)
        per_sample = raw_batch.get("latent_shape", self.default_latent_shape)
        if per_sample is None:
            raise ValueError("WanAdapter: the batch has no latents and no latent_shape; pass "
                             "latent_shape=(C, F, H, W) to the adapter (pipeline_config.latent_shape)")
        return (self._batch_size(raw_batch),) + tuple(int(s) for s in per_sample)

    def prepare_batch(self, raw_batch: Mapping[str, Any], latents_source: str = "zeros") -> WanBatch:
        if latents_source not in LATENT_SOURCES:
            raise ValueError(f"latents_source must be one of {LATENT_SOURCES}, got {latents_source!r}")
        cond = self._text_cond(raw_batch)
        batch_size = cond["text_states"].shape[0]
        device = cond["text_states"].device
        if latents_source == "data":
            if "latents" not in raw_batch:
                raise ValueError("this method trains on data latents but the batch has no 'latents' "
                                 f"(keys: {sorted(raw_batch)}); use a dataset with VAE latents")
            latents = self._to_device(raw_batch["latents"]).to(self.latent_dtype)
            if latents.dim() != 5:
                raise ValueError(f"batch latents must be [B, C, F, H, W], got shape {tuple(latents.shape)}")
        else:
            latents = torch.zeros(self.latent_shape(raw_batch), dtype=self.latent_dtype, device=device)
        if latents.shape[0] != batch_size:
            raise ValueError(f"batch has {latents.shape[0]} latents but {batch_size} texts")
        uncond = None
        if raw_batch.get("negative_text_states") is not None:
            neg = self._to_device(raw_batch["negative_text_states"])
            neg = _one_text(neg).expand(batch_size, -1, -1) if neg.dim() == 2 or neg.shape[0] == 1 else neg
            if neg.dim() != 3 or neg.shape[0] != batch_size:
                raise ValueError(f"negative_text_states of shape {tuple(neg.shape)} does not fit "
                                 f"a batch of {batch_size}")
            uncond = {"text_states": neg}
        return WanBatch(latents=latents, cond=cond, latents_source=latents_source, uncond=uncond)

    def _text_cond(self, raw_batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        if raw_batch.get("text_states") is not None:
            states = self._to_device(raw_batch["text_states"])
            if states.dim() != 3:
                raise ValueError(f"text_states must be [B, L, D], got shape {tuple(states.shape)}")
            return {"text_states": states}
        if raw_batch.get("prompts") is not None:
            return self.encode_prompts(raw_batch["prompts"])
        raise ValueError(f"the batch needs 'text_states' or 'prompts' (keys: {sorted(raw_batch)})")

    def _batch_size(self, raw_batch: Mapping[str, Any]) -> int:
        if raw_batch.get("text_states") is not None:
            return int(raw_batch["text_states"].shape[0])
        if raw_batch.get("prompts") is not None:
            return len(raw_batch["prompts"])
        raise ValueError(f"the batch needs 'text_states' or 'prompts' (keys: {sorted(raw_batch)})")

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.device is None else x.to(self.device)


def _one_text(states: torch.Tensor) -> torch.Tensor:
    """``[L, D]`` or ``[1, L, D]`` -> ``[1, L, D]``."""
    states = torch.as_tensor(states)
    if states.dim() == 2:
        states = states[None]
    if states.dim() != 3 or states.shape[0] != 1:
        raise ValueError(f"one text's states must be [L, D] or [1, L, D], got shape {tuple(states.shape)}")
    return states


def _is_causal(handle) -> bool:
    return hasattr(getattr(handle, "module", handle), "forward_block")


def _causal_module(handle):
    """The block-causal DiT behind a role handle (a bare module is accepted too)."""
    module = getattr(handle, "module", handle)
    if not _is_causal(module):
        name = getattr(handle, "name", type(module).__name__)
        raise ValueError(f"role {name!r} is a bidirectional {type(module).__name__}; this operation needs a "
                         "block-causal model (set models.<role>.causal: true)")
    return module


def _call_block(handle, x_block, t_block, text, cache, start_frame):
    """``forward_block`` of the handle's causal DiT. Under a DeepSpeed engine it must run inside the
    engine's forward: ZeRO-3 gathers a partitioned parameter that the model reads directly (e.g. the
    time embedding's weights) only while the engine marks a forward in progress. So the module's
    ``forward`` is pointed at ``forward_block`` for the duration of one engine call."""
    module = _causal_module(handle)
    engine = getattr(handle, "engine", None)
    if engine is None:
        return module.forward_block(x_block, t_block, text, cache, start_frame)
    module.forward = module.forward_block
    try:
        return engine(x_block, t_block, text, cache, start_frame)
    finally:
        del module.forward  # back to the class's masked-path forward
