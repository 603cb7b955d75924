"""Fused flash attention in Triton: forward and backward, with frame-block masks.

Math (FlashAttention-2). For one query row ``i`` and the keys ``j`` it may see (``visible(i, j)``),
with logits ``s_ij = scale * q_i . k_j``::

    o_i   = sum_j softmax_j(s_ij) v_j            (online: running max m_i, running sum l_i)
    lse_i = log sum_j exp(s_ij)                  (saved for backward, base 2 inside the kernels)
    dv_j  = sum_i p_ij do_i
    dp_ij = do_i . v_j,   delta_i = do_i . o_i,   ds_ij = p_ij (dp_ij - delta_i)
    dq_i  = scale * sum_j ds_ij k_j,   dk_j = scale * sum_i ds_ij q_i

``visible(i, j)`` is the mask of ``attention.build_mask``: with block size ``N`` and query position
``t = i + q_offset``, the query's frame block ends at ``e = (t // N + 1) * N`` and key ``j`` is
visible iff ``j < e`` (block-causal), ``j >= e - window or j < sinks`` (local window with sink keys)
and ``j < key_len[b]`` (padded keys). Every condition is monotone in ``i`` and ``j``, so each query
tile sees a contiguous range of key tiles (plus the sink tiles) and each key tile is seen by a
contiguous range of query tiles. The kernels visit only those tiles, and apply the per-element mask
only on tiles that straddle a mask edge ("masked" loops); interior tiles run mask-free.

Rows that see no key at all return zeros (their lse is stored as +inf so backward gives zero too).

All accumulation is in float32. ``tl.dot`` takes bf16/fp16 operands directly on GPU; Triton's CPU
interpreter computes bf16 dots wrongly (triton 3.9), so under the interpreter the dot operands are
widened to float32 (``UPCAST_DOT``). The interpreter also rounds float32 -> bf16 toward zero where
the GPU rounds to nearest even, so interpreter bf16 results differ from GPU ones by about an ulp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import interpreting, require_triton_device

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _visible(q_pos, k_idx, kv_len, n_blk, window, sinks,
             BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Mask (True = attend) for broadcastable absolute query positions and key indices."""
    ok = k_idx < kv_len
    if BLOCK_CAUSAL:
        q_end = (q_pos // n_blk + 1) * n_blk
        ok = ok & (k_idx < q_end)
        if WINDOW:
            ok = ok & ((k_idx >= q_end - window) | (k_idx < sinks))
    return ok


@triton.jit
def _order_ranges(a, full_lo, full_hi, hi):
    """Clamp to ``a <= b <= c <= hi`` with ``[b, c)`` inside ``[full_lo, full_hi)``; every range
    may come out empty."""
    hi = tl.maximum(hi, a)
    b = tl.minimum(tl.maximum(full_lo, a), hi)
    c = tl.minimum(tl.maximum(full_hi, b), hi)
    return a, b, c, hi


@triton.jit
def _key_ranges(start_m, SEQ_Q, kv_len, q_offset, n_blk, window, sinks,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Key-tile ranges one query tile must visit.

    Returns ``sink_end, a, b, c, hi``: masked sink tiles ``[0, sink_end)``, masked ``[a, b)``,
    mask-free ``[b, c)``, masked ``[c, hi)``. All bounds but ``hi`` are multiples of BLOCK_N.
    """
    q_first = start_m + q_offset
    q_last = tl.minimum(start_m + BLOCK_M, SEQ_Q) - 1 + q_offset
    hi = kv_len
    full_hi = kv_len
    end_first = kv_len
    end_last = kv_len
    if BLOCK_CAUSAL:
        end_first = (q_first // n_blk + 1) * n_blk
        end_last = (q_last // n_blk + 1) * n_blk
        hi = tl.minimum(end_last, kv_len)
        full_hi = tl.minimum(end_first, kv_len)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    lo = 0
    full_lo = 0
    sink_end = 0
    if WINDOW:
        lo = (tl.maximum(end_first - window, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(end_last - window, 0), BLOCK_N) * BLOCK_N
        sink_end = tl.cdiv(tl.minimum(sinks, hi), BLOCK_N) * BLOCK_N
    a, b, c, hi = _order_ranges(tl.maximum(lo, sink_end), full_lo, full_hi, hi)
    return sink_end, a, b, c, hi


@triton.jit
def _query_ranges(start_n, SEQ_Q, SEQ_K, kv_len, q_offset, n_blk, window, sinks,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query-tile ranges one key tile is seen by: masked ``[a, b)``, mask-free ``[b, c)``,
    masked ``[c, hi)``. A query ``i`` sees key ``j`` (block-causal) iff
    ``i >= (j // N) * N - q_offset``, and (window, non-sink ``j``) iff
    ``i < ((j + W) // N) * N - q_offset``."""
    k_last = tl.minimum(start_n + BLOCK_N, SEQ_K) - 1
    lo = 0
    full_lo = 0
    hi = SEQ_Q
    full_hi = SEQ_Q
    if BLOCK_CAUSAL:
        lo = tl.maximum((start_n // n_blk) * n_blk - q_offset, 0)
        full_lo = tl.maximum((k_last // n_blk) * n_blk - q_offset, 0)
        if WINDOW:  # sink keys are seen by every later query; the window bounds the others
            hi = tl.where(start_n >= sinks,
                          tl.minimum(((k_last + window) // n_blk) * n_blk - q_offset, SEQ_Q), SEQ_Q)
            full_hi = tl.where(k_last >= sinks,
                               tl.minimum(((start_n + window) // n_blk) * n_blk - q_offset, SEQ_Q),
                               SEQ_Q)
    # a tile holding invalid keys is never fully visible; one holding only invalid keys is unseen
    full_lo = tl.where(start_n + BLOCK_N > kv_len, SEQ_Q, full_lo)
    hi = tl.where(start_n >= kv_len, 0, hi)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_M) * BLOCK_M
    return _order_ranges(lo, full_lo, full_hi, hi)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, lo, hi,
               q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, EVEN_D: tl.constexpr,
               UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k_idx = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + k_idx[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
        v_ptrs = v_base + k_idx[:, None].to(tl.int64) * stride_vs + offs_d[None, :]
        if MASKED:
            ld = (k_idx[:, None] < SEQ_K) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=ld, other=0.0)
            v = tl.load(v_ptrs, mask=ld, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST_DOT, PRECISION) * qk_scale  # log2 units
        if MASKED:
            ok = _visible(q_pos[:, None], k_idx[None, :], kv_len, n_blk, window, sinks,
                          BLOCK_CAUSAL, WINDOW)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        else:
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, KEY_LENS,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                     H, SEQ_Q, SEQ_K, q_offset, n_blk, window, sinks, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_len = SEQ_K
    if HAS_KEY_LENS:
        kv_len = tl.minimum(tl.load(KEY_LENS + b).to(tl.int32), SEQ_K)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    row_ok = offs_m[:, None] < SEQ_Q
    d_ok = offs_d[None, :] < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                mask=row_ok & d_ok, other=0.0)
    q_pos = offs_m + q_offset

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    sink_end, a, b_, c, hi = _key_ranges(start_m, SEQ_Q, kv_len, q_offset, n_blk, window, sinks,
                                         BLOCK_M, BLOCK_N, BLOCK_CAUSAL, WINDOW)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, 0, sink_end,
                               q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
                               HEAD_DIM, BLOCK_N, True, BLOCK_CAUSAL, WINDOW, EVEN_D,
                               UPCAST_DOT, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, a, b_,
                               q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
                               HEAD_DIM, BLOCK_N, True, BLOCK_CAUSAL, WINDOW, EVEN_D,
                               UPCAST_DOT, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, b_, c,
                               q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
                               HEAD_DIM, BLOCK_N, False, BLOCK_CAUSAL, WINDOW, EVEN_D,
                               UPCAST_DOT, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, c, hi,
                               q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
                               HEAD_DIM, BLOCK_N, True, BLOCK_CAUSAL, WINDOW, EVEN_D,
                               UPCAST_DOT, PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok & d_ok)
    tl.store(LSE + bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh,
                      stride_db, stride_ds, stride_dh, H, SEQ_Q,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d o_id * do_id (float32)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
                 + offs_m[:, None].to(tl.int64) * stride_ds + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * SEQ_Q + offs_m, delta, mask=offs_m < SEQ_Q)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, lo, hi,
              q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, EVEN_D: tl.constexpr,
              UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k_idx = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + k_idx[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
        v_ptrs = v_base + k_idx[:, None].to(tl.int64) * stride_vs + offs_d[None, :]
        if MASKED:
            ld = (k_idx[:, None] < SEQ_K) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=ld, other=0.0)
            v = tl.load(v_ptrs, mask=ld, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST_DOT, PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            ok = _visible(q_pos[:, None], k_idx[None, :], kv_len, n_blk, window, sinks,
                          BLOCK_CAUSAL, WINDOW)
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST_DOT, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST_DOT, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KEY_LENS,
                        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                        stride_dqb, stride_dqs, stride_dqh,
                        H, SEQ_Q, SEQ_K, q_offset, n_blk, window, sinks, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                        HAS_KEY_LENS: tl.constexpr,
                        UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_len = SEQ_K
    if HAS_KEY_LENS:
        kv_len = tl.minimum(tl.load(KEY_LENS + b).to(tl.int32), SEQ_K)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + rows * stride_qs + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
                 + rows * stride_ds + offs_d[None, :], mask=ok, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * SEQ_Q + offs_m, mask=offs_m < SEQ_Q, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * SEQ_Q + offs_m, mask=offs_m < SEQ_Q, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q_pos = offs_m + q_offset

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    sink_end, a, b_, c, hi = _key_ranges(start_m, SEQ_Q, kv_len, q_offset, n_blk, window, sinks,
                                         BLOCK_M, BLOCK_N, BLOCK_CAUSAL, WINDOW)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, 0, sink_end,
                   q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
                   HEAD_DIM, BLOCK_N, True, BLOCK_CAUSAL, WINDOW, EVEN_D, UPCAST_DOT, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, a, b_,
                   q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
                   HEAD_DIM, BLOCK_N, True, BLOCK_CAUSAL, WINDOW, EVEN_D, UPCAST_DOT, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, b_, c,
                   q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
                   HEAD_DIM, BLOCK_N, False, BLOCK_CAUSAL, WINDOW, EVEN_D, UPCAST_DOT, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, c, hi,
                   q_pos, offs_d, kv_len, SEQ_K, n_blk, window, sinks, qk_scale,
                   HEAD_DIM, BLOCK_N, True, BLOCK_CAUSAL, WINDOW, EVEN_D, UPCAST_DOT, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + rows * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds,
                lo, hi, k_idx, offs_d, kv_len, SEQ_Q, q_offset, n_blk, window, sinks, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, EVEN_D: tl.constexpr,
                UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Transposed orientation: scores are ``[BLOCK_N, BLOCK_M]`` (keys x queries)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None].to(tl.int64) * stride_ds + offs_d[None, :]
        if MASKED:
            ld = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(q_ptrs, mask=ld, other=0.0)
            do = tl.load(do_ptrs, mask=ld, other=0.0)
            lse = tl.load(lse_base + offs_m, mask=offs_m < SEQ_Q, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < SEQ_Q, other=0.0)
        else:
            if EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = _dot(k, tl.trans(q), UPCAST_DOT, PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            ok = _visible(offs_m[None, :] + q_offset, k_idx[:, None], kv_len, n_blk, window, sinks,
                          BLOCK_CAUSAL, WINDOW)
            p_t = tl.where(ok, p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, UPCAST_DOT, PRECISION)
        dp_t = _dot(v, tl.trans(do), UPCAST_DOT, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, UPCAST_DOT, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KEY_LENS,
                          stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                          stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                          H, SEQ_Q, SEQ_K, q_offset, n_blk, window, sinks, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                          HAS_KEY_LENS: tl.constexpr,
                          UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_len = SEQ_K
    if HAS_KEY_LENS:
        kv_len = tl.minimum(tl.load(KEY_LENS + b).to(tl.int32), SEQ_K)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    k_idx = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (k_idx[:, None] < SEQ_K) & (offs_d[None, :] < HEAD_DIM)
    rows = k_idx[:, None].to(tl.int64)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                + rows * stride_ks + offs_d[None, :], mask=ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                + rows * stride_vs + offs_d[None, :], mask=ok, other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    lse_base = LSE + bh.to(tl.int64) * SEQ_Q
    delta_base = DELTA + bh.to(tl.int64) * SEQ_Q

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    a, b_, c, hi = _query_ranges(start_n, SEQ_Q, SEQ_K, kv_len, q_offset, n_blk, window, sinks,
                                 BLOCK_M, BLOCK_N, BLOCK_CAUSAL, WINDOW)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds,
                         a, b_, k_idx, offs_d, kv_len, SEQ_Q, q_offset, n_blk, window, sinks,
                         qk_scale, HEAD_DIM, BLOCK_M, True, BLOCK_CAUSAL, WINDOW, EVEN_D,
                         UPCAST_DOT, PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds,
                         b_, c, k_idx, offs_d, kv_len, SEQ_Q, q_offset, n_blk, window, sinks,
                         qk_scale, HEAD_DIM, BLOCK_M, False, BLOCK_CAUSAL, WINDOW, EVEN_D,
                         UPCAST_DOT, PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds,
                         c, hi, k_idx, offs_d, kv_len, SEQ_Q, q_offset, n_blk, window, sinks,
                         qk_scale, HEAD_DIM, BLOCK_M, True, BLOCK_CAUSAL, WINDOW, EVEN_D,
                         UPCAST_DOT, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
             + rows * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
             + rows * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------------------

# On GPU each kernel is autotuned once per (head dim, dtype, mask kind) over a short list; the
# autotuner drops configs that run out of shared memory. Under the interpreter, or when the caller
# pins tiles, the plain kernels run with the given tiles.
_MASK_KEYS = ["HEAD_DIM", "BLOCK_CAUSAL", "WINDOW", "HAS_KEY_LENS"]


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in pairs]


_fwd_tuned = triton.autotune(
    _configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)]),
    key=_MASK_KEYS)(_attn_fwd_kernel)
_dq_tuned = triton.autotune(
    _configs([(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)]),
    key=_MASK_KEYS)(_attn_bwd_dq_kernel)
_dkdv_tuned = triton.autotune(
    _configs([(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4)]),
    key=_MASK_KEYS)(_attn_bwd_dkdv_kernel)


class _Launch:
    """Everything a launch needs besides the tensors: mask scalars, flags and tiles."""

    def __init__(self, q, k, key_lens, block_causal_tokens, q_offset, window_tokens, sink_tokens,
                 scale, block_m, block_n):
        self.B, self.Sq, self.H, self.D = q.shape
        self.Sk = k.shape[1]
        self.block_d = max(16, triton.next_power_of_2(self.D))
        self.sm_scale = float(scale) if scale is not None else self.D ** -0.5
        self.block_causal = block_causal_tokens is not None
        self.window = window_tokens is not None
        self.mask_args = (int(q_offset), int(block_causal_tokens or 1), int(window_tokens or 0),
                          int(sink_tokens or 0))
        self.key_lens = key_lens
        self.pinned = block_m is not None or block_n is not None or interpreting(_attn_fwd_kernel)
        self.block_m = block_m or 16
        self.block_n = block_n or 16
        self.upcast = interpreting(_attn_fwd_kernel) and q.dtype == torch.bfloat16
        self.precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def flags(self):
        return dict(HEAD_DIM=self.D, BLOCK_D=self.block_d, BLOCK_CAUSAL=self.block_causal,
                    WINDOW=self.window, HAS_KEY_LENS=self.key_lens is not None,
                    UPCAST_DOT=self.upcast, PRECISION=self.precision)

    def tiles(self):
        return {} if not self.pinned else dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n)

    def key_lens_arg(self, like):
        return self.key_lens if self.key_lens is not None else like


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _forward(q, k, v, cfg: _Launch):
    o = torch.empty_like(q)
    lse = torch.empty((cfg.B * cfg.H, cfg.Sq), device=q.device, dtype=torch.float32)
    kernel = _attn_fwd_kernel if cfg.pinned else _fwd_tuned
    grid = lambda meta: (triton.cdiv(cfg.Sq, meta["BLOCK_M"]), cfg.B * cfg.H)  # noqa: E731
    kernel[grid](q, k, v, o, lse, cfg.key_lens_arg(lse), *_strides(q), *_strides(k), *_strides(v),
                 *_strides(o), cfg.H, cfg.Sq, cfg.Sk, *cfg.mask_args, cfg.sm_scale * LOG2E,
                 **cfg.flags(), **cfg.tiles())
    return o, lse


def _backward(do, q, k, v, o, lse, cfg: _Launch):
    delta = torch.empty_like(lse)
    block = 64 if not interpreting(_attn_fwd_kernel) else 16
    _bwd_delta_kernel[(triton.cdiv(cfg.Sq, block), cfg.B * cfg.H)](
        o, do, delta, *_strides(o), *_strides(do), cfg.H, cfg.Sq,
        HEAD_DIM=cfg.D, BLOCK_D=cfg.block_d, BLOCK_M=block)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = (cfg.H, cfg.Sq, cfg.Sk, *cfg.mask_args, cfg.sm_scale * LOG2E, cfg.sm_scale)
    dq_kernel = _attn_bwd_dq_kernel if cfg.pinned else _dq_tuned
    dq_grid = lambda meta: (triton.cdiv(cfg.Sq, meta["BLOCK_M"]), cfg.B * cfg.H)  # noqa: E731
    dq_kernel[dq_grid](q, k, v, do, dq, lse, delta, cfg.key_lens_arg(lse), *_strides(q),
                       *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *common,
                       **cfg.flags(), **cfg.tiles())
    dkdv_kernel = _attn_bwd_dkdv_kernel if cfg.pinned else _dkdv_tuned
    dkdv_grid = lambda meta: (triton.cdiv(cfg.Sk, meta["BLOCK_N"]), cfg.B * cfg.H)  # noqa: E731
    dkdv_kernel[dkdv_grid](q, k, v, do, dk, dv, lse, delta, cfg.key_lens_arg(lse), *_strides(q),
                           *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
                           *_strides(dv), *common, **cfg.flags(), **cfg.tiles())
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Autograd wrapper: forward saves ``lse``; backward runs delta, dq and dk/dv kernels."""

    @staticmethod
    def forward(ctx, q, k, v, cfg: _Launch):
        o, lse = _forward(q, k, v, cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.cfg)
        return dq, dk, dv, None


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_attention(q, k, v, *, block_causal_tokens=None, q_offset=0, key_lens=None,
                    window_tokens=None, sink_tokens=0, scale=None, block_m=None, block_n=None):
    """Triton flash attention on ``[B, S, H, D]`` tensors; same mask semantics as ``build_mask``.

    ``block_m``/``block_n`` pin the query/key tile sizes (powers of two >= 16); by default the GPU
    autotunes them and the interpreter uses 16.
    """
    require_triton_device(q, _attn_fwd_kernel, "attention")
    for name, t in (("block_m", block_m), ("block_n", block_n)):
        if t is not None and (t < 16 or t & (t - 1)):
            raise ValueError(f"{name}={t} must be a power of two >= 16")
    if q.shape[-1] > 256:
        raise ValueError(f"triton attention supports head dims up to 256, got {q.shape[-1]}")
    if key_lens is not None:
        key_lens = torch.as_tensor(key_lens, device=q.device).to(torch.int32).contiguous()
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    cfg = _Launch(q, k, key_lens, block_causal_tokens, q_offset, window_tokens, sink_tokens,
                  scale, block_m, block_n)
    return FlashAttention.apply(q, k, v, cfg)
