"""Shared pieces of the method tests: a toy adapter over tiny networks, tiny Wan bundles."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

import torch
from torch import nn

from megadistill.diffusion import FlowMatchScheduler
from megadistill.methods import ModelBundle, RoleHandle


@dataclass
class ToyBatch:
    latents: torch.Tensor
    cond: Any
    latents_source: str
    uncond: Any = None

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])


class ToyFlow(nn.Module):
    """v = weight * x_t + cond (cond: one number per sample, shape [B])."""

    def __init__(self, weight: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([float(weight)]))  # 1-D: DeepSpeed broadcasts no 0-d params

    def forward(self, x_t, t, cond):
        return self.weight * x_t + cond.reshape(-1, *([1] * (x_t.dim() - 1)))


class ToyAdapter:
    """Adapter protocol over ToyFlow networks; records every call for inspection.

    Raw batch: {"cond": [B] tensor, optional "latents"}; latent shape (B, 2, 1, 2, 2);
    the negative conditioning is ``negative`` for every sample.
    """

    def __init__(self, shift: float = 1.0, negative: float = 0.0):
        self.noise_scheduler = FlowMatchScheduler(1000, shift)
        self.negative = negative
        self.calls: List[dict] = []      # one per network call: handle name, inputs, output
        self.noised: List[dict] = []     # one per add_noise call

    def predict_flow(self, handle, x_t, t, cond):
        v = handle(x_t, t, cond)
        self.calls.append(dict(role=handle.name, x_t=x_t, t=t, cond=cond, v=v, grad=torch.is_grad_enabled()))
        return v

    def predict_x0(self, handle, x_t, t, cond):
        x0 = self.noise_scheduler.x0_from_flow(x_t, self.predict_flow(handle, x_t, t, cond), t)
        self.calls[-1]["x0"] = x0
        return x0

    def add_noise(self, x0, eps, t):
        x_t = self.noise_scheduler.add_noise(x0, eps, t)
        self.noised.append(dict(x0=x0, eps=eps, t=t, x_t=x_t))
        return x_t

    def encode_prompts(self, prompts):
        return torch.tensor([float(len(p)) for p in prompts])

    def negative_cond(self, batch):
        return torch.full((batch.batch_size,), float(self.negative))

    def where_cond(self, mask, cond, other):
        return torch.where(mask, cond, other)

    def latent_shape(self, raw):
        return (raw["cond"].shape[0], 2, 1, 2, 2)

    def prepare_batch(self, raw, latents_source="zeros"):
        if latents_source == "data":
            latents = raw["latents"]
        else:
            latents = torch.zeros(self.latent_shape(raw))
        return ToyBatch(latents, raw["cond"], latents_source)

    def backward(self, handle, loss):
        handle.backward(loss)


def toy_bundle(lr: float = 1e-2, weights=(0.5, 0.3, 0.7)) -> ModelBundle:
    roles = {}
    for (name, trainable), w in zip((("student", True), ("teacher", False), ("critic", True)), weights):
        net = ToyFlow(w)
        opt = torch.optim.SGD(net.parameters(), lr=lr) if trainable else None
        roles[name] = RoleHandle(name, net, trainable, optimizer=opt)
    return ModelBundle(roles)


# -- tiny Wan ---------------------------------------------------------------------------------------

LATENT_SHAPE = (16, 2, 4, 4)   # (C, F, H, W): 2 x 2 x 2 = 8 tokens per sample with patch (1, 2, 2)


def tiny_wan(seed: int):
    from megadistill.models.wan import WanDiT, get_preset, init_weights

    return init_weights(WanDiT(get_preset("tiny")), seed=seed)


def tiny_wan_bundle(roles=("student", "teacher", "critic"), lr: float = 1e-3) -> ModelBundle:
    handles = {}
    for i, name in enumerate(roles):
        net = tiny_wan(seed=10 + i)
        trainable = name != "teacher"
        opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.0, 0.999)) if trainable else None
        handles[name] = RoleHandle(name, net, trainable, optimizer=opt, grad_clip=10.0 if trainable else None)
    return ModelBundle(handles)


def wan_batch(batch_size: int = 2, text_len: int = 8, with_latents: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    raw = {"text_states": torch.randn(batch_size, text_len, 64, generator=g)}
    if with_latents:
        raw["latents"] = torch.randn(batch_size, *LATENT_SHAPE, generator=g)
    return raw


def wan_adapter(shift: float = 5.0, **kwargs):
    from megadistill.models.wan.adapter import WanAdapter

    kwargs.setdefault("negative_text_states", torch.randn(6, 64, generator=torch.Generator().manual_seed(99)))
    return WanAdapter(None, FlowMatchScheduler(1000, shift), latent_shape=LATENT_SHAPE, **kwargs)


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module: nn.Module, before: dict) -> bool:
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
