"""Fused elementwise ops: references against independent formulas, triton against references."""
import pytest
import torch

from megadistill.kernels import gated_residual, modulate, rms_norm_rope
from megadistill.kernels.elementwise import (gated_residual_reference, modulate_reference,
                                             rms_norm_rope_reference)

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       # Triton's interpreter rounds float32 -> bf16 toward zero (the GPU rounds to nearest): 1 ulp
       torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()


def _grads(out, inputs, seed=9):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, inputs, g)


def _assert_same(got, want, dtype):
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_modulate_reference_formula():
    x, shift, scale = _randn(2, 5, 24), _randn(2, 1, 24, seed=1), _randn(2, 5, 24, seed=2)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale) + shift
    torch.testing.assert_close(modulate_reference(x, shift, scale, 1e-6), want)


def test_rms_norm_rope_reference_formula():
    """Against Wan's formulation: RMSNorm in float32, then RoPE as a complex multiply of pairs."""
    B, S, H, D = 2, 6, 3, 8
    x, w = _randn(B, S, H * D), _randn(H * D, seed=1)
    angle = _randn(S, D // 2, seed=2).detach()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    z = torch.view_as_complex(y.reshape(B, S, H, D // 2, 2)) * torch.polar(torch.ones_like(angle),
                                                                           angle)[None, :, None]
    want = torch.view_as_real(z).reshape(B, S, H * D)
    torch.testing.assert_close(rms_norm_rope_reference(x, w, angle.cos(), angle.sin(), 1e-6), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_token", [False, True], ids=["B1C", "BSC"])
def test_modulate_triton(dtype, per_token, device):
    B, S, C = 2, 7, 48
    x = _randn(B, S, C, dtype=dtype, device=device)
    shift = _randn(B, S if per_token else 1, C, device=device, seed=1)
    scale = _randn(B, S if per_token else 1, C, device=device, seed=2)
    got = modulate(x, shift, scale, 1e-6, backend="triton")
    want = modulate(x, shift, scale, 1e-6, backend="reference")
    _assert_same(got, want, dtype)
    for a, b in zip(_grads(got, (x, shift, scale)), _grads(want, (x, shift, scale))):
        torch.testing.assert_close(a, b)
    as_f32 = modulate(x, shift, scale, backend="triton", out_dtype=torch.float32)
    assert as_f32.dtype == torch.float32
    torch.testing.assert_close(as_f32, modulate_reference(x, shift, scale, 1e-6, torch.float32),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("batched_angles", [False, True], ids=["SD", "BSD"])
def test_rms_norm_rope_triton(dtype, batched_angles, device):
    B, S, H, D = 2, 5, 3, 16
    x = _randn(B, S, H * D, dtype=dtype, device=device)
    w = _randn(H * D, device=device, seed=1)
    angle = _randn(*((B,) if batched_angles else ()), S, D // 2, device=device, seed=2).detach()
    cos, sin = angle.cos(), angle.sin()
    got = rms_norm_rope(x, w, cos, sin, 1e-6, backend="triton")
    want = rms_norm_rope(x, w, cos, sin, 1e-6, backend="reference")
    _assert_same(got, want, dtype)
    for a, b in zip(_grads(got, (x, w)), _grads(want, (x, w))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_gated_residual_triton(dtype, device):
    B, S, C = 2, 6, 40
    x, y = _randn(B, S, C, dtype=dtype, device=device), _randn(B, S, C, dtype=dtype, device=device, seed=1)
    gate = _randn(B, 1, C, device=device, seed=2)
    got = gated_residual(x, y, gate, backend="triton")
    want = gated_residual(x, y, gate, backend="reference")
    _assert_same(got, want, dtype)
    torch.testing.assert_close(want, (x.float() + y.float() * gate).to(dtype))
    for a, b in zip(_grads(got, (x, y, gate)), _grads(want, (x, y, gate))):
        torch.testing.assert_close(a, b)


def test_auto_is_reference_on_cpu():
    x, shift, scale = _randn(1, 3, 8), _randn(1, 1, 8, seed=1), _randn(1, 1, 8, seed=2)
    assert torch.equal(modulate(x, shift, scale), modulate_reference(x, shift, scale))
    assert torch.equal(gated_residual(x, x, shift), gated_residual_reference(x, x, shift))


@pytest.mark.parametrize("call, match", [
    (lambda x: modulate(x, x[:, :1, :4], x[:, :1]), "shift has shape"),
    (lambda x: gated_residual(x, x[:, :2], x[:, :1]), "one shape"),
    (lambda x: rms_norm_rope(x, torch.ones(8), torch.ones(3, 3), torch.ones(3, 3)), "not a multiple"),
    (lambda x: rms_norm_rope(x, torch.ones(8), torch.ones(4, 2), torch.ones(4, 2)), "must both be"),
    (lambda x: modulate(x, x, x, backend="fused"), "unknown elementwise backend"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(2, 3, 8))
