"""Triton kernels for the DiT's row-wise elementwise work (forward only; see ``elementwise``).

One program handles one token row (all ``C`` channels), so the row statistics of LayerNorm and
RMSNorm stay in registers and each input is read once and the output written once, where PyTorch
would run several passes over float32 temporaries.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import require_triton_device


@triton.jit
def _modulate_kernel(X, SHIFT, SCALE, OUT, S, C, stride_xr, stride_hb, stride_hs,
                     stride_cb, stride_cs, stride_or, eps, BLOCK_C: tl.constexpr):
    """out = (x - mean) * rsqrt(var + eps) * (1 + scale) + shift over one row, in float32."""
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * stride_xr + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / C
    xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / C + eps)
    shift = tl.load(SHIFT + b * stride_hb + s * stride_hs + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_cb + s * stride_cs + cols, mask=ok, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(OUT + row * stride_or + cols, y.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_rope_kernel(X, W, COS, SIN, OUT, S, HIDDEN, HALF_D, stride_xr, stride_cb, stride_cs,
                          stride_or, eps, BLOCK_P: tl.constexpr):
    """RMSNorm over the whole row, then rotate interleaved pairs (2p, 2p+1) by the angle of
    pair ``p % HALF_D`` of the row's position."""
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    p = tl.arange(0, BLOCK_P)
    ok = p < HIDDEN // 2
    x_even = tl.load(X + row * stride_xr + 2 * p, mask=ok, other=0.0).to(tl.float32)
    x_odd = tl.load(X + row * stride_xr + 2 * p + 1, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x_even * x_even, 0) + tl.sum(x_odd * x_odd, 0)) / HIDDEN + eps)
    y_even = x_even * rstd * tl.load(W + 2 * p, mask=ok, other=0.0).to(tl.float32)
    y_odd = x_odd * rstd * tl.load(W + 2 * p + 1, mask=ok, other=0.0).to(tl.float32)
    j = p % HALF_D
    cos = tl.load(COS + b * stride_cb + s * stride_cs + j, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(SIN + b * stride_cb + s * stride_cs + j, mask=ok, other=0.0).to(tl.float32)
    out_ty = OUT.dtype.element_ty
    tl.store(OUT + row * stride_or + 2 * p, (y_even * cos - y_odd * sin).to(out_ty), mask=ok)
    tl.store(OUT + row * stride_or + 2 * p + 1, (y_even * sin + y_odd * cos).to(out_ty), mask=ok)


@triton.jit
def _gated_residual_kernel(X, Y, GATE, OUT, S, C, stride_xr, stride_yr, stride_gb, stride_gs,
                           stride_or, BLOCK_C: tl.constexpr):
    """out = x + y * gate in float32, stored in the output's dtype."""
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * stride_xr + cols, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + row * stride_yr + cols, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(GATE + b * stride_gb + s * stride_gs + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_or + cols, (x + y * g).to(OUT.dtype.element_ty), mask=ok)


def _rows(t):
    """``[B, S, C]`` -> row stride, requiring unit stride on C and rows laid out evenly."""
    if t.stride(-1) != 1 or t.stride(0) != t.shape[1] * t.stride(1):
        t = t.contiguous()
    return t, t.stride(1)


def _bs_strides(t):
    """Batch and sequence strides of a ``[B, 1 or S, C]`` per-token vector (0 where broadcast)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _warps(block):
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def modulate(x, shift, scale, eps, out_dtype):
    require_triton_device(x, _modulate_kernel, "modulate")
    B, S, C = x.shape
    x, sx = _rows(x)
    shift, shb, shs = _bs_strides(shift.expand(B, -1, -1) if shift.shape[0] == 1 else shift)
    scale, scb, scs = _bs_strides(scale.expand(B, -1, -1) if scale.shape[0] == 1 else scale)
    out = torch.empty((B, S, C), device=x.device, dtype=out_dtype)
    block = triton.next_power_of_2(C)
    _modulate_kernel[(B * S,)](x, shift, scale, out, S, C, sx, shb, shs, scb, scs, out.stride(1),
                               float(eps), BLOCK_C=block, num_warps=_warps(block))
    return out


def rms_norm_rope(x, weight, cos, sin, eps):
    require_triton_device(x, _rms_norm_rope_kernel, "rms_norm_rope")
    B, S, hidden = x.shape
    x, sx = _rows(x)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, cb, cs = _bs_strides(cos.contiguous())
    sin = sin.contiguous()  # same shape as cos (checked by the dispatcher), so same strides
    out = torch.empty_like(x)
    block = triton.next_power_of_2(hidden // 2)
    _rms_norm_rope_kernel[(B * S,)](x, weight.contiguous(), cos, sin, out, S, hidden, cos.shape[-1],
                                    sx, cb, cs, out.stride(1), float(eps), BLOCK_P=block,
                                    num_warps=_warps(block))
    return out


def gated_residual(x, y, gate):
    require_triton_device(x, _gated_residual_kernel, "gated_residual")
    B, S, C = x.shape
    x, sx = _rows(x)
    y, sy = _rows(y)
    gate, gb, gs = _bs_strides(gate.expand(B, -1, -1) if gate.shape[0] == 1 else gate)
    out = torch.empty_like(x)
    block = min(1024, triton.next_power_of_2(C))
    _gated_residual_kernel[(B * S, triton.cdiv(C, block))](x, y, gate, out, S, C, sx, sy, gb, gs,
                                                          out.stride(1), BLOCK_C=block,
                                                          num_warps=_warps(block))
    return out
