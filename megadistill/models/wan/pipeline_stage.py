"""One pipeline stage of a Wan DiT: the slice of the model that runs on pipeline rank ``s`` of ``P``.

The blocks are split into P contiguous ranges (:func:`megadistill.models.wan.keys.even_stage_blocks`
by default). Stage 0 also holds the patch and text embeddings, the last stage the head; every
stage holds the time path (``time_embedding``, ``time_projection``), because each block's adaLN
modulation reads the projected time (the placement of :func:`keys.pp_stage_of`). Parameter names
stay Wan's native names (``blocks.7.self_attn.q.weight``), so a stage's ``state_dict`` is its
slice of the full one.

A stage is called as ``stage(inputs, timestep, cond, latent_shape) -> outputs`` (the calling
convention of ``megadistill.pipeline.executor``):

    stage 0       inputs (latents [B, C, F, H, W],)       noisy latents of the op
    stage s       inputs (x [B, S, dim], context [B, L, dim])
    stage < P-1   outputs (x, context)                    the hop activations to stage s+1
    stage P-1     outputs (flow [B, C, F, H, W],)         the DiT's output, as ``WanDiT.forward``

``timestep`` ([B] or [B, F]) and ``cond`` (the Wan adapter's ``{"text_states": ...}``) are given
on every stage; only stage 0 reads the text. ``latent_shape`` gives the token grid for RoPE and
the head's unpatchify. The projected text (``context``) travels with the hidden states because
the text embedding lives on stage 0; its gradient travels back with theirs.

The time path is replicated: each stage's copy receives the gradient of that stage's blocks (and
the head), so the full gradient of a time-path parameter is the SUM of its copies' gradients over
the pipeline group (:meth:`WanPipelineStage.replicated_parameters`; the executor all-reduces them
before the optimizer step, which keeps the copies equal).

Tensor parallel: split a model that :func:`megadistill.models.wan.parallel.parallelize_wan` has
made tensor parallel; the blocks then run on head shards exactly as in the full model. Ulysses
sequence parallel is not supported inside a stage.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .dit import WanDiT, rope_cos_sin
from .keys import even_stage_blocks

_REPLICATED_PREFIXES = ("time_embedding.", "time_projection.")


class WanPipelineStage(nn.Module):
    """Stage ``stage`` of ``num_stages`` of a Wan DiT (see the module docstring). Shares (does not
    copy) the parameters of ``model``; drop the model afterwards to free the other stages' slices.

    ``stage_blocks``: the ``(start, stop)`` block range of every stage (default: even split)."""

    def __init__(self, model: WanDiT, stage: int, num_stages: int, stage_blocks=None):
        super().__init__()
        if not isinstance(model, WanDiT):
            raise TypeError(f"WanPipelineStage splits a WanDiT, got {type(model).__name__}")
        if getattr(model, "sp_group", None) is not None:
            raise ValueError("a Wan pipeline stage does not support Ulysses sequence parallel (parallel.sp > 1); "
                             "use parallel.sp = 1 with parallel.pp > 1")
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} is not in [0, {num_stages})")
        num_layers = len(model.blocks)
        stage_blocks = even_stage_blocks(num_layers, num_stages) if stage_blocks is None else \
            [tuple(r) for r in stage_blocks]
        _check_stage_blocks(stage_blocks, num_layers, num_stages)
        self.config = model.config
        self.stage, self.num_stages = stage, num_stages
        self.block_range = stage_blocks[stage]
        if self.is_first:
            self.patch_embedding = model.patch_embedding
            self.text_embedding = model.text_embedding
        self.time_embedding = model.time_embedding
        self.time_projection = model.time_projection
        lo, hi = self.block_range
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(lo, hi)})
        if self.is_last:
            self.head = model.head

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def replicated_parameters(self) -> list:
        """Parameters every stage holds a copy of (the time path): their gradients are summed over
        the pipeline group before the optimizer step."""
        return [p for name, p in self.named_parameters() if name.startswith(_REPLICATED_PREFIXES)]

    # WanDiT's embedding and unpatchify methods read only ``config`` and the submodules this stage
    # holds under the same names, so they are reused as plain functions on the stage.
    def token_grid(self, latents_shape):
        return WanDiT.token_grid(self, torch.empty(latents_shape, device="meta"))

    def forward(self, inputs, timestep, cond, latent_shape):
        grid = self.token_grid(latent_shape)
        batch = latent_shape[0]
        if self.is_first:
            (latents,) = _expect(inputs, 1, "stage 0 takes (latents,)")
            x = WanDiT.embed_tokens(self, latents.to(self.patch_embedding.weight.dtype))
            context = WanDiT.embed_text(self, cond["text_states"].to(x.dtype))
        else:
            x, context = _expect(inputs, 2, f"stage {self.stage} takes (x, context)")
        t = timestep.to(x.device) if torch.is_tensor(timestep) else timestep
        e, e0 = WanDiT.embed_time(self, t, batch)
        if e.shape[1] not in (1, grid[0]):
            raise ValueError(f"per-frame timestep has {e.shape[1]} entries, latents have {grid[0]} frames")
        rope = rope_cos_sin(self.config, grid, x.device)
        for block in self.blocks.values():
            x = block(x, e0, context, rope)
        if not self.is_last:
            return x, context
        return (WanDiT.unpatchify(self, self.head(x, e), grid),)


def _expect(inputs, n: int, what: str):
    inputs = tuple(inputs)
    if len(inputs) != n:
        raise ValueError(f"{what}; got {len(inputs)} tensors")
    return inputs


def _check_stage_blocks(stage_blocks, num_layers: int, num_stages: int) -> None:
    if len(stage_blocks) != num_stages:
        raise ValueError(f"stage_blocks has {len(stage_blocks)} ranges for {num_stages} stages")
    lo = 0
    for s, (a, b) in enumerate(stage_blocks):
        if a != lo or b <= a:
            raise ValueError(f"stage_blocks {stage_blocks}: stage {s} must start at block {lo} and hold at "
                             f"least one block (contiguous ranges covering 0..{num_layers})")
        lo = b
    if lo != num_layers:
        raise ValueError(f"stage_blocks {stage_blocks} cover {lo} blocks; the model has {num_layers}")


def wan_pipeline_stage(model: WanDiT, stage: int, num_stages: int, stage_blocks=None) -> WanPipelineStage:
    """The stage ``stage`` of ``num_stages`` of ``model`` (see :class:`WanPipelineStage`)."""
    return WanPipelineStage(model, stage, num_stages, stage_blocks)
