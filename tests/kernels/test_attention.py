"""Attention backends against the reference oracle, and the Triton kernels' tile skipping.

Shapes are tiny (S <= 64, 16-wide tiles) so that many tiles and every mask edge are exercised while
the Triton interpreter stays fast.
"""
import pytest
import torch
import triton
import triton.language as tl

from megadistill.kernels import attention, build_mask, resolve_backend, visible_pairs
from megadistill.kernels.triton_attention import _key_ranges, _query_ranges, flash_attention

# name -> (B, Sq, Sk, H, D, mask kwargs, tiles (block_m, block_n))
CASES = {
    "full": (1, 48, 48, 2, 32, {}, (16, 16)),
    "full_tail": (2, 37, 29, 2, 32, {}, (16, 16)),
    "block_causal": (1, 50, 50, 2, 32, dict(block_causal_tokens=16), (16, 16)),
    "block_causal_unaligned": (1, 50, 50, 2, 24, dict(block_causal_tokens=12), (16, 16)),
    "kv_cache_prefix": (1, 24, 64, 2, 32, dict(block_causal_tokens=8, q_offset=40), (16, 16)),
    "kv_cache_unaligned": (1, 20, 57, 2, 16, dict(block_causal_tokens=10, q_offset=37), (16, 16)),
    "key_lens": (2, 40, 29, 2, 32, dict(key_lens=[29, 7]), (16, 16)),
    "window_sink": (1, 64, 64, 2, 32, dict(block_causal_tokens=8, window_tokens=24, sink_tokens=5),
                    (16, 16)),
    "window_sink_tall_q_tiles": (1, 64, 64, 2, 32, dict(block_causal_tokens=8, window_tokens=24,
                                                        sink_tokens=5), (32, 16)),
    "window_sink_wide_k_tiles": (1, 64, 64, 2, 32, dict(block_causal_tokens=8, window_tokens=24,
                                                        sink_tokens=5), (16, 32)),
    "window_sink_kv_cache": (1, 16, 60, 2, 16, dict(block_causal_tokens=8, q_offset=44,
                                                    window_tokens=20, sink_tokens=3), (16, 16)),
    "block_causal_key_lens": (2, 48, 48, 1, 32, dict(block_causal_tokens=16, key_lens=[48, 21]),
                              (16, 16)),
    "head_dim_64": (1, 40, 40, 1, 64, dict(block_causal_tokens=16), (16, 16)),
    "head_dim_128": (1, 33, 33, 1, 128, {}, (16, 32)),
}


def _inputs(case, dtype, device, seed=0):
    B, Sq, Sk, H, D, kw, tiles = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, s, H, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
               for s in (Sq, Sk, Sk))
    do = torch.randn(B, Sq, H, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do, kw, tiles


def _run(fn, q, k, v, do):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6)).item()


@pytest.mark.parametrize("case, dtype", [(c, d) for c in CASES for d in (torch.float32, torch.bfloat16)]
                         + [(c, torch.float16) for c in ("kv_cache_unaligned", "window_sink")],
                         ids=[f"{c}-{d}" for c in CASES for d in ("fp32", "bf16")]
                         + ["kv_cache_unaligned-fp16", "window_sink-fp16"])
def test_triton_matches_reference(case, dtype, device):
    q, k, v, do, kw, (bm, bn) = _inputs(case, dtype, device)
    got = _run(lambda *t: flash_attention(*t, block_m=bm, block_n=bn, **kw), q, k, v, do)
    if dtype == torch.float32:
        want = _run(lambda *t: attention(*t, backend="reference", **kw), q, k, v, do)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"{case} {name}")
    else:
        # bf16/fp16: compare with the float32 oracle on the same (rounded) inputs; the kernel rounds
        # p and ds to the input dtype before its matmuls, as every flash kernel does.
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        want = _run(lambda *t: attention(*t, backend="reference", **kw), q32, k32, v32, do.float())
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert a.dtype == dtype
            assert _rel_err(a, b) < 3e-2, f"{case} {name}: rel err {_rel_err(a, b):.3g}"


def test_triton_default_tiles_and_scale(device):
    """The public dispatcher with backend='triton' (default tiles) and a custom softmax scale."""
    q, k, v, do, kw, _ = _inputs("kv_cache_unaligned", torch.float32, device)
    got = _run(lambda *t: attention(*t, backend="triton", scale=0.3, **kw), q, k, v, do)
    want = _run(lambda *t: attention(*t, backend="reference", scale=0.3, **kw), q, k, v, do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_triton_rows_without_keys_are_zero(device):
    """key_len 0 leaves a row nothing to attend: the kernel returns zeros and zero gradients."""
    q, k, v, do, _, _ = _inputs("key_lens", torch.float32, device)
    out, dq, dk, dv = _run(lambda *t: flash_attention(*t, key_lens=[0, 7], block_m=16, block_n=16),
                           q, k, v, do)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert out[0].abs().max() == 0 and dq[0].abs().max() == 0
    assert dk[0].abs().max() == 0 and dv[0].abs().max() == 0
    want = attention(q[1:], k[1:], v[1:], backend="reference", key_lens=[7])
    torch.testing.assert_close(out[1:], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["full_tail", "kv_cache_unaligned", "key_lens", "window_sink"])
def test_sdpa_matches_reference(case):
    q, k, v, do, kw, _ = _inputs(case, torch.float32, "cpu")
    got = _run(lambda *t: attention(*t, backend="sdpa", **kw), q, k, v, do)
    want = _run(lambda *t: attention(*t, backend="reference", **kw), q, k, v, do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_block_causal_mask_semantics():
    """Query i sees key j iff j // N <= (i + q_offset) // N; the window counts back from the end
    of the query's frame block and sink keys stay visible."""
    m = build_mask(6, 12, device="cpu", block_causal_tokens=3, q_offset=6)[0, 0]
    for i in range(6):
        for j in range(12):
            assert bool(m[i, j]) == (j // 3 <= (i + 6) // 3)
    m = build_mask(12, 12, device="cpu", block_causal_tokens=3, window_tokens=6, sink_tokens=2)[0, 0]
    assert m[11].tolist() == [True, True] + [False] * 4 + [True] * 6
    assert m[3].tolist() == [True] * 6 + [False] * 6


def test_auto_backend_on_cpu_is_sdpa():
    q = torch.zeros(1, 2, 1, 8)
    assert resolve_backend("auto", q) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, backend="flash")


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.zeros(1, 4, 2, 8)), "must agree on batch, heads"),
    (dict(key_lens=[3, 3]), "one per batch element"),
    (dict(window_tokens=4), "need block_causal_tokens"),
    (dict(window_tokens=4, backend="triton"), "need block_causal_tokens"),
    (dict(block_causal_tokens=0), "block_causal_tokens must be >= 1"),
    (dict(q_offset=-1), "q_offset must be >= 0"),
])
def test_bad_inputs_raise(bad, match):
    q = torch.zeros(1, 4, 1, 8)
    k = bad.pop("k", q)
    with pytest.raises(ValueError, match=match):
        attention(q, k, k, **{"backend": "reference", **bad})


@pytest.mark.parametrize("kw", [
    {}, dict(block_causal_tokens=7), dict(block_causal_tokens=7, q_offset=20),
    dict(block_causal_tokens=5, window_tokens=12, sink_tokens=3), dict(key_lens=[30, 4], batch=2),
    dict(block_causal_tokens=5, q_offset=9, window_tokens=10, sink_tokens=12, key_lens=[17]),
])
def test_visible_pairs_counts_the_mask(kw):
    kw = dict(kw)
    batch = kw.pop("batch", 1)
    m = build_mask(23, 33, device="cpu", **kw)
    want = 23 * 33 * batch if m is None else int(m.expand(batch, 1, 23, 33).sum())
    assert visible_pairs(23, 33, batch=batch, **kw) == want


# ----------------------------------------------------------------------------------------------
# Tile skipping: the ranges the kernels visit, checked against the dense mask
# ----------------------------------------------------------------------------------------------

RANGE_CASES = [
    # Sq, Sk, q_offset, N (None = full), window, sinks, kv_len, BM, BN
    (64, 64, 0, None, None, 0, 64, 16, 16),
    (50, 45, 0, None, None, 0, 31, 16, 32),
    (96, 96, 0, 16, None, 0, 96, 16, 16),
    (96, 96, 0, 24, None, 0, 96, 32, 16),
    (40, 112, 72, 20, None, 0, 112, 16, 32),
    (128, 128, 0, 16, 48, 8, 128, 16, 16),
    (128, 128, 0, 16, 40, 20, 128, 32, 16),
    (48, 150, 102, 24, 60, 30, 150, 16, 32),
    (128, 128, 0, 16, 48, 0, 100, 16, 16),
]


@triton.jit
def _key_probe(OUT, SEQ_Q, kv_len, q_offset, n_blk, window, sinks, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    pid = tl.program_id(0)
    r0, r1, r2, r3, r4 = _key_ranges(pid * BLOCK_M, SEQ_Q, kv_len, q_offset, n_blk, window, sinks,
                                     BLOCK_M, BLOCK_N, BLOCK_CAUSAL, WINDOW)
    tl.store(OUT + pid * 5 + 0, r0)
    tl.store(OUT + pid * 5 + 1, r1)
    tl.store(OUT + pid * 5 + 2, r2)
    tl.store(OUT + pid * 5 + 3, r3)
    tl.store(OUT + pid * 5 + 4, r4)


@triton.jit
def _query_probe(OUT, SEQ_Q, SEQ_K, kv_len, q_offset, n_blk, window, sinks, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    pid = tl.program_id(0)
    r0, r1, r2, r3 = _query_ranges(pid * BLOCK_N, SEQ_Q, SEQ_K, kv_len, q_offset, n_blk, window,
                                   sinks, BLOCK_M, BLOCK_N, BLOCK_CAUSAL, WINDOW)
    tl.store(OUT + pid * 4 + 0, r0)
    tl.store(OUT + pid * 4 + 1, r1)
    tl.store(OUT + pid * 4 + 2, r2)
    tl.store(OUT + pid * 4 + 3, r3)


def _tiles(ranges, step):
    return {s for lo, hi in ranges for s in range(lo, hi, step)}


@pytest.mark.parametrize("case", RANGE_CASES, ids=[str(c) for c in RANGE_CASES])
def test_tile_ranges_cover_exactly_the_visible_tiles(case, device):
    """Per query tile (forward, dq) and per key tile (dk/dv): every tile holding a visible pair is
    visited, every visited tile holds one (windows here are at least a block wide), no tile is
    visited twice, and tiles run without the element mask only where all their pairs are visible."""
    Sq, Sk, off, n, window, sinks, kv_len, bm, bn = case
    kw = dict(block_causal_tokens=n, q_offset=off, window_tokens=window, sink_tokens=sinks,
              key_lens=[kv_len])
    mask = build_mask(Sq, Sk, device="cpu", **kw).expand(1, 1, Sq, Sk)[0, 0]
    flags = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_CAUSAL=n is not None, WINDOW=window is not None)
    scalars = (off, n or 1, window or 0, sinks)

    n_q, n_k = -(-Sq // bm), -(-Sk // bn)
    out = torch.full((n_q, 5), -1, dtype=torch.int32, device=device)
    _key_probe[(n_q,)](out, Sq, kv_len, *scalars, **flags)
    skipped = 0
    for t, (sink_end, a, b, c, hi) in enumerate(out.tolist()):
        rows = mask[t * bm:(t + 1) * bm]
        visited = sorted(_tiles([(0, sink_end), (a, b), (b, c), (c, hi)], bn))
        assert len(visited) == len(set(visited)) and sink_end <= a <= b <= c
        assert len(_tiles([(0, sink_end), (a, hi)], bn)) == len(visited), "ranges overlap"
        for s in range(0, Sk, bn):
            any_visible = bool(rows[:, s:s + bn].any())
            assert (s in visited) == any_visible, f"q tile {t}, key tile at {s}: {out[t].tolist()}"
            if s in _tiles([(b, c)], bn):
                assert s + bn <= Sk and bool(rows[:, s:s + bn].all()), f"unmasked tile {s} not full"
        skipped += n_k - len(visited)

    out = torch.full((n_k, 4), -1, dtype=torch.int32, device=device)
    _query_probe[(n_k,)](out, Sq, Sk, kv_len, *scalars, **flags)
    for t, (a, b, c, hi) in enumerate(out.tolist()):
        cols = mask[:, t * bn:(t + 1) * bn]
        visited = sorted(_tiles([(a, b), (b, c), (c, hi)], bm))
        assert a <= b <= c and len(visited) == len(set(visited))
        for s in range(0, Sq, bm):
            assert (s in visited) == bool(cols[s:s + bm].any()), f"k tile {t}, q tile at {s}"
            if s in _tiles([(b, c)], bm):
                assert s + bm <= Sq and t * bn + bn <= Sk and bool(cols[s:s + bm].all())
    if case in RANGE_CASES[2:4] + RANGE_CASES[5:]:  # these leave whole key tiles invisible
        assert skipped > 0


# ----------------------------------------------------------------------------------------------
# GPU: real Wan shapes (few heads to bound the oracle's memory)
# ----------------------------------------------------------------------------------------------


def _sdpa_fp32(q, k, v, do, kw):
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    return _run(lambda *t: attention(*t, backend="sdpa", **kw), q32, k32, v32, do.float())


@pytest.mark.gpu
@pytest.mark.parametrize("shape, kw", [
    ((1, 32760, 32760, 2), {}),
    ((1, 9360, 9360, 2), dict(block_causal_tokens=4680)),
    ((1, 4680, 14040, 2), dict(block_causal_tokens=4680, q_offset=9360)),
    ((1, 9360, 9360, 2), dict(block_causal_tokens=1560, window_tokens=4680, sink_tokens=1560)),
    ((2, 4096, 512, 4), dict(key_lens=[512, 77])),
])
def test_triton_gpu_real_shapes(shape, kw):
    B, Sq, Sk, H = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, s, H, 128, device="cuda", generator=g, dtype=torch.bfloat16)
               .requires_grad_() for s in (Sq, Sk, Sk))
    do = torch.randn(B, Sq, H, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    want = _sdpa_fp32(q, k, v, do, kw)
    got = _run(lambda *t: attention(*t, backend="triton", **kw), q, k, v, do)
    base = _run(lambda *t: attention(*t, backend="sdpa", **kw), q, k, v, do)
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), got, base, want):
        err, err_sdpa = _rel_err(a, w), _rel_err(b, w)
        assert err <= 2 * err_sdpa + 2e-3, f"{name}: triton {err:.3g} vs sdpa bf16 {err_sdpa:.3g}"
