"""The single-process reference every layout is compared with: the tiny Wan DiT, inputs, the loss
``sum(out * G) / B``, its gradients and one AdamW step."""
import copy
from dataclasses import dataclass

import torch

import megadistill.distributed as md
from megadistill.models.wan import WanDiT, get_preset, init_weights
from megadistill.models.wan.parallel import allreduce_sequence_parallel_grads, gather_tp_tensor, parallelize_wan

TOL = 1e-5


def assert_close(got, want, what: str, tol: float = TOL):
    """``max|got - want| <= tol * max(1, max|want|)``: absolute for tensors of magnitude up to 1,
    relative to the tensor's scale above (gradients of order 1 sum thousands of fp32 terms in
    another order under each layout)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs difference {err:.3g} > {tol:g} * {scale:.3g}"
# The first AdamW step moves each weight by about lr * g / (|g| + eps): a gradient error delta shifts it
# by up to lr * delta / eps, so lr / eps stays small against TOL / (fp32 gradient error ~1e-8).
ADAMW = dict(lr=1e-4, betas=(0.0, 0.999), eps=1e-6, weight_decay=0.01)

# (batch, latent frames, latent height, latent width): token grid (F, H/2, W/2)
SHAPES = {
    "odd": (2, 3, 2, 6),      # grid (3, 1, 3): 9 tokens, 3 per frame: sp 2 pads one token and splits a frame
    "aligned": (2, 2, 4, 6),  # grid (2, 2, 3): 12 tokens, 6 per frame: sp 2 chunks are whole frames
}


def tiny_config():
    return get_preset("tiny")


def tiny_model(seed: int = 0) -> WanDiT:
    return init_weights(WanDiT(tiny_config()), seed=seed)


def make_inputs(shape, per_frame: bool, seed: int = 1):
    cfg = tiny_config()
    b, f, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_dim, f, h, w, generator=g)
    t = torch.rand(b, f, generator=g) * 1000 if per_frame else torch.rand(b, generator=g) * 1000
    text = torch.randn(b, 7, cfg.text_dim, generator=g)
    weight = torch.randn(b, cfg.out_dim, f, h, w, generator=g)  # loss = sum(out * weight) / B
    return x, t, text, weight


@dataclass
class Reference:
    out: torch.Tensor
    grads: dict
    updated: dict


def reference_step(model: WanDiT, x, t, text, weight) -> Reference:
    """Forward, backward of ``sum(out * weight) / B`` and one AdamW step, in one process."""
    model = copy.deepcopy(model)
    out = model(x, t, text)
    (out * weight).sum().div(x.shape[0]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), **ADAMW).step()
    return Reference(out.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()})


def check_layout(model: WanDiT, tp_group, sp_group, inputs, ref: Reference, what: str):
    """Parallelize a copy of ``model`` over the groups and check forward, every parameter's gradient
    (tp shards gathered, sp contributions summed) and the parameters after one AdamW step."""
    x, t, text, weight = inputs
    par = parallelize_wan(copy.deepcopy(model), tp_group, sp_group)
    out = par(x, t, text)
    assert_close(out, ref.out, f"{what} forward")
    (out * weight).sum().div(x.shape[0]).backward()
    allreduce_sequence_parallel_grads(par, sp_group)
    for name, p in par.named_parameters():
        grad = gather_tp_tensor(name, p.grad, tp_group)
        assert_close(grad, ref.grads[name], f"{what} d{name}")
    torch.optim.AdamW(par.parameters(), **ADAMW).step()
    for name, p in par.named_parameters():
        assert_close(gather_tp_tensor(name, p, tp_group), ref.updated[name], f"{what} {name} after AdamW")
    return par


def tp_slice(name, full, group):
    """This rank's tp shard of a full native tensor."""
    from megadistill.models.wan.keys import tp_split_dim

    d = tp_split_dim(name)
    size = 1 if group is None else torch.distributed.get_world_size(group)
    if d is None or size == 1:
        return full
    return md.tp_shard(full, d, torch.distributed.get_rank(group), size)
