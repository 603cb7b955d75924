"""Fused elementwise ops of the Wan DiT block, each with a plain PyTorch reference.

    modulate(x, shift, scale, eps)        = LayerNorm(x; no affine, eps) * (1 + scale) + shift
    rms_norm_rope(x, weight, cos, sin, eps) = RoPE(RMSNorm(x; over all H*D channels) * weight)
    gated_residual(x, y, gate)            = x + y * gate

All three compute in float32. ``modulate`` returns ``out_dtype`` (default x's dtype); the other two
return x's dtype. Backends: ``reference`` (PyTorch), ``triton`` (fused kernels of
``triton_elementwise``); ``auto`` picks triton for CUDA tensors when triton imports. The triton
path is differentiable: its backward recomputes the reference under autograd (the forward is
where fusion pays; the backward runs once per training step through PyTorch's kernels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import triton_importable

BACKENDS = ("auto", "reference", "triton")


def _resolve(backend, x):
    if backend not in BACKENDS:
        raise ValueError(f"unknown elementwise backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_importable() else "reference"
    return backend


def _check_per_token(name, t, x):
    B, S, C = x.shape
    if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] not in (1, S) or t.shape[2] != C:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B, 1, C] or [B, S, C] "
                         f"with B={B}, S={S}, C={C}")


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def modulate_reference(x, shift, scale, eps=1e-6, out_dtype=None):
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + scale.float()) + shift.float()
    return y.to(out_dtype or x.dtype)


def rms_norm_rope_reference(x, weight, cos, sin, eps=1e-6):
    """RMSNorm over the full hidden dim, then rotate pairs (2i, 2i+1) of every head:
    out[2i] = y[2i] cos_i - y[2i+1] sin_i,  out[2i+1] = y[2i] sin_i + y[2i+1] cos_i."""
    B, S, hidden = x.shape
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    half = cos.shape[-1]
    y = y.view(B, S, hidden // (2 * half), half, 2)
    c = cos.float().reshape(-1, S, 1, half)
    s = sin.float().reshape(-1, S, 1, half)
    even, odd = y[..., 0], y[..., 1]
    out = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1)
    return out.reshape(B, S, hidden).to(x.dtype)


def gated_residual_reference(x, y, gate):
    return (x.float() + y.float() * gate.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton path with a recomputing backward
# ----------------------------------------------------------------------------------------------


class _FusedForward(torch.autograd.Function):
    """Forward: a fused kernel. Backward: recompute ``reference`` on the saved inputs under
    autograd and differentiate it (identical math, so identical gradients up to rounding)."""

    @staticmethod
    def forward(ctx, kernel, reference, kwargs, *tensors):
        ctx.reference = reference
        ctx.kwargs = kwargs
        ctx.save_for_backward(*tensors)
        return kernel(*tensors, **kwargs)

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        inputs = [t.detach().requires_grad_(n) for t, n in zip(tensors, needs)]
        with torch.enable_grad():
            out = ctx.reference(*inputs, **ctx.kwargs)
            wanted = [t for t, n in zip(inputs, needs) if n]
            grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
        return (None, None, None, *[next(grads) if n else None for n in needs])


def modulate(x, shift, scale, eps=1e-6, *, out_dtype=None, backend="auto"):
    """LayerNorm(x, no affine) * (1 + scale) + shift in float32; x ``[B, S, C]``, shift/scale
    ``[B, 1, C]`` or ``[B, S, C]``. Returns ``out_dtype`` (default x's dtype)."""
    if x.dim() != 3:
        raise ValueError(f"modulate expects x [B, S, C], got {tuple(x.shape)}")
    _check_per_token("shift", shift, x)
    _check_per_token("scale", scale, x)
    out_dtype = out_dtype or x.dtype
    if _resolve(backend, x) == "reference":
        return modulate_reference(x, shift, scale, eps, out_dtype)
    from . import triton_elementwise as tk

    return _FusedForward.apply(tk.modulate, modulate_reference, dict(eps=eps, out_dtype=out_dtype),
                               x, shift, scale)


def rms_norm_rope(x, weight, cos, sin, eps=1e-6, *, backend="auto"):
    """RMSNorm over all ``H*D`` channels times ``weight``, then interleaved-pair RoPE per head.

    x ``[B, S, H*D]``, weight ``[H*D]``, cos/sin ``[S, D/2]`` or ``[B, S, D/2]`` (the head dim D is
    ``2 * cos.shape[-1]``). Returns x's dtype.
    """
    if x.dim() != 3:
        raise ValueError(f"rms_norm_rope expects x [B, S, H*D], got {tuple(x.shape)}")
    B, S, hidden = x.shape
    if weight.shape != (hidden,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [{hidden}]")
    if cos.shape != sin.shape or cos.dim() not in (2, 3) or cos.shape[-2] != S or (
            cos.dim() == 3 and cos.shape[0] not in (1, B)):
        raise ValueError(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must both be [S, D/2] "
                         f"or [B, S, D/2] with S={S}, B={B}")
    if hidden % (2 * cos.shape[-1]):
        raise ValueError(f"hidden size {hidden} is not a multiple of the head dim "
                         f"2 * cos.shape[-1] = {2 * cos.shape[-1]}")
    if _resolve(backend, x) == "reference":
        return rms_norm_rope_reference(x, weight, cos, sin, eps)
    from . import triton_elementwise as tk

    return _FusedForward.apply(tk.rms_norm_rope, rms_norm_rope_reference, dict(eps=eps),
                               x, weight, cos, sin)


def gated_residual(x, y, gate, *, backend="auto"):
    """x + y * gate in float32, cast back to x's dtype; gate ``[B, 1, C]`` or ``[B, S, C]``."""
    if x.dim() != 3 or y.shape != x.shape:
        raise ValueError(f"gated_residual expects x and y [B, S, C] of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    _check_per_token("gate", gate, x)
    if _resolve(backend, x) == "reference":
        return gated_residual_reference(x, y, gate)
    from . import triton_elementwise as tk

    return _FusedForward.apply(tk.gated_residual, gated_residual_reference, {}, x, y, gate)
