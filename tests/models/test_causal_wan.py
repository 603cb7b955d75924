"""CausalWanDiT: the masked whole-clip path and the cached block-by-block path agree; the cache
keeps, evicts and overwrites exactly the frames it should; gradients flow; bad input is refused."""

import pytest
import torch

import megadistill.distributed as md
from megadistill.models.wan import WanDiT, get_preset, init_weights
from megadistill.models.wan.causal import CausalSelfAttentionFn, CausalWanDiT, KVCache
from megadistill.models.wan.parallel import parallelize_wan

from _dist_spawn import spawn

CFG = get_preset("tiny")  # 2 layers, 4 heads of 32; latents 8x8 -> 4x4 = 16 tokens per frame
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def weights():
    return init_weights(WanDiT(CFG), seed=0).state_dict()


def causal(weights, nfpb, window=None, sinks=0, dtype=torch.float32):
    model = CausalWanDiT(CFG, num_frame_per_block=nfpb, local_window_frames=window, sink_frames=sinks)
    model.load_state_dict(weights)
    return model.to(dtype).eval()


def inputs(frames, batch=2, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, 8, 8, generator=g, dtype=dtype)
    t = (torch.rand(batch, frames, generator=g) * 1000).to(dtype)  # differs per frame and block
    text = torch.randn(batch, 9, CFG.text_dim, generator=g, dtype=dtype)
    return x, t, text


def rollout(model, x, t, text, cache=None):
    n = model.num_frame_per_block
    cache = cache if cache is not None else model.new_cache(x.shape[0], x.shape[2])
    outs = [model.forward_block(x[:, :, s:s + n], t[:, s:s + n], text, cache, s)
            for s in range(0, x.shape[2], n)]
    return torch.cat(outs, dim=2), cache


# --- the two paths agree --------------------------------------------------------------------------

@pytest.mark.parametrize("nfpb,frames", [(1, 6), (2, 6), (3, 6), (3, 9)])
def test_cached_rollout_equals_masked_clip(weights, nfpb, frames):
    model = causal(weights, nfpb)
    x, t, text = inputs(frames)
    with torch.no_grad():
        masked = model(x, t, text)
        cached, cache = rollout(model, x, t, text)
        bidirectional = causal(weights, frames)(x, t, text)
    torch.testing.assert_close(cached, masked, **TOL)
    assert cache.end_frame == frames and cache.frames == list(range(frames))
    assert tuple(cache.k[0].shape) == (2, frames * 16, CFG.num_heads, CFG.head_dim)
    assert tuple(cache.cross_k[0].shape) == (2, CFG.text_len, CFG.num_heads, CFG.head_dim)
    # causality: all but the last block see less than the whole clip, so they differ from it
    assert (masked[:, :, :frames - nfpb] - bidirectional[:, :, :frames - nfpb]).abs().max() > 1e-3
    # ... and do not depend on later frames at all
    x2 = x.clone()
    x2[:, :, nfpb:] = torch.randn_like(x2[:, :, nfpb:])
    with torch.no_grad():
        torch.testing.assert_close(model(x2, t, text)[:, :, :nfpb], masked[:, :, :nfpb], rtol=0, atol=1e-6)


def test_one_block_clip_equals_bidirectional_wan(weights):
    bidi = WanDiT(CFG).eval()
    bidi.load_state_dict(weights)
    model = causal(weights, 3)
    x, t, text = inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text), bidi(x, t, text), **TOL)
        torch.testing.assert_close(model(x, t[:, 0], text), bidi(x, t[:, 0], text), **TOL)
        # the cached path on a single block is the same function
        cached = model.forward_block(x, t, text, model.new_cache(2, 3), 0)
    torch.testing.assert_close(cached, bidi(x, t, text).detach(), **TOL)


@pytest.mark.parametrize("nfpb,window,sinks,frames", [(1, 2, 1, 7), (3, 3, 0, 9), (2, 3, 1, 8), (2, 4, 2, 10)])
def test_window_and_sinks_cached_equals_masked_with_eviction(weights, nfpb, window, sinks, frames):
    model = causal(weights, nfpb, window, sinks)
    x, t, text = inputs(frames)
    with torch.no_grad():
        masked = model(x, t, text)
        cache = model.new_cache(2)  # no max_frames: storage is sinks + window, any length fits
        cached, _ = rollout(model, x, t, text, cache)
        full_prefix = causal(weights, nfpb)(x, t, text)
    torch.testing.assert_close(cached, masked, **TOL)
    assert cache.storage_frames == sinks + window and cache.evicted
    assert tuple(cache.k[1].shape) == (2, (sinks + window) * 16, CFG.num_heads, CFG.head_dim)
    assert cache.frames == sorted(set(range(sinks)) | set(range(frames - window, frames)))
    # the window bites: the last block sees less than the whole prefix
    assert (masked[:, :, -nfpb:] - full_prefix[:, :, -nfpb:]).abs().max() > 1e-3


def test_window_cache_bounded_by_max_frames(weights):
    model = causal(weights, 1, window=4, sinks=1)
    x, t, text = inputs(3)
    with torch.no_grad():
        cached, cache = rollout(model, x, t, text, model.new_cache(2, max_frames=3))
        torch.testing.assert_close(cached, model(x, t, text), **TOL)
    assert cache.storage_frames == 3 and not cache.evicted
    with pytest.raises(ValueError, match="overflow"):
        model.forward_block(x[:, :, :1], t[:, :1], None, cache, 3)


def test_reset_starts_a_new_rollout_with_a_new_prompt(weights):
    model = causal(weights, 2)
    x, t, text = inputs(4)
    x2, _, text2 = inputs(4, seed=2)
    t_block = torch.tensor([900.0, 300.0])  # one timestep per sample ([B]) for every frame
    t_frames = t_block[:, None].expand(2, 4)
    with torch.no_grad():
        _, cache = rollout(model, x, t, text)
        cache.reset()
        assert cache.end_frame == 0 and cache.frames == [] and cache.cross_k[0] is None
        outs = [model.forward_block(x2[:, :, s:s + 2], t_block, text2, cache, s) for s in (0, 2)]
        torch.testing.assert_close(torch.cat(outs, dim=2), model(x2, t_frames, text2), **TOL)
        torch.testing.assert_close(torch.cat(outs, dim=2), model(x2, t_block, text2), **TOL)


def test_bfloat16_paths_agree(weights):
    model = causal(weights, 2, window=2, sinks=1, dtype=torch.bfloat16)
    x, t, text = inputs(6, dtype=torch.bfloat16)
    with torch.no_grad():
        masked = model(x, t, text).float()
        cached, cache = rollout(model, x, t, text, model.new_cache(2))
    assert cache.k[0].dtype == torch.bfloat16 and cache.evicted
    # bf16 rounding (~0.3% here) is far below what the window changes (~5%)
    assert (cached.float() - masked).abs().max() <= 0.01 * masked.abs().max()


# --- refresh: re-running a block overwrites exactly its slots -------------------------------------

@pytest.mark.parametrize("nfpb,window,sinks,blocks", [(2, None, 0, 3), (1, 2, 1, 5)])
def test_rerun_at_t0_overwrites_exactly_that_block(weights, nfpb, window, sinks, blocks):
    model = causal(weights, nfpb, window, sinks)
    frames = nfpb * blocks
    x, t, text = inputs(frames)
    clean = torch.randn(2, 16, nfpb, 8, 8, generator=torch.Generator().manual_seed(7))
    last = frames - nfpb
    t0 = torch.zeros(2, nfpb)
    with torch.no_grad():
        _, cache = rollout(model, x, t, text, model.new_cache(2, frames))
        before = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
        frames_before = cache.frames
        model.forward_block(clean, t0, None, cache, last)
        # fresh: the same prefix, then the block written once, directly with the clean input
        fresh = model.new_cache(2, frames)
        rollout(model, x[:, :, :last], t[:, :last], text, fresh)
        model.forward_block(clean, t0, text, fresh, last)
    T = 16
    block_tokens = torch.cat([torch.arange(cache.slot_of(f) * T, (cache.slot_of(f) + 1) * T)
                              for f in range(last, frames)])
    other = torch.ones(cache.k[0].shape[1], dtype=torch.bool)
    other[block_tokens] = False
    assert cache.frames == frames_before and cache.end_frame == frames
    for layer in range(CFG.num_layers):
        for now, old, ref in ((cache.k[layer], before[layer][0], fresh.k[layer]),
                              (cache.v[layer], before[layer][1], fresh.v[layer])):
            assert torch.equal(now[:, other], old[:, other])
            assert not torch.equal(now[:, block_tokens], old[:, block_tokens])
            torch.testing.assert_close(now[:, block_tokens], ref[:, block_tokens], rtol=0, atol=1e-6)


def test_rerun_earlier_block_without_window_truncates(weights):
    model = causal(weights, 2)
    x, t, text = inputs(6)
    with torch.no_grad():
        _, cache = rollout(model, x, t, text)
        out = model.forward_block(x[:, :, 2:4], t[:, 2:4], None, cache, 2)
        ref, _ = rollout(model, x[:, :, :4], t[:, :4], text)
    assert cache.end_frame == 4 and cache.frames == [0, 1, 2, 3]
    torch.testing.assert_close(out, ref[:, :, 2:4], **TOL)


# --- gradients ------------------------------------------------------------------------------------

def test_masked_gradients_equal_bidirectional_for_one_block(weights):
    bidi = WanDiT(CFG)
    bidi.load_state_dict(weights)
    model = causal(weights, 3)
    x, t, text = inputs(3)
    w = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for m in (bidi, model):
        xi = x.clone().requires_grad_()
        (m(xi, t, text) * w).sum().backward()
        grads.append((xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], **TOL)
    assert grads[1][1].keys() == grads[0][1].keys()
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_masked_gradient_matches_finite_differences(weights):
    model = causal(weights, 1, window=2, sinks=1, dtype=torch.float64)
    x, t, text = inputs(4, batch=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1, 16, 4, 8, 8, generator=g, dtype=torch.float64)
    d = torch.randn(x.shape, generator=g, dtype=torch.float64)
    xi = x.clone().requires_grad_()
    (model(xi, t, text) * w).sum().backward()

    def central_difference(eps):
        with torch.no_grad():
            return ((model(x + eps * d, t, text) - model(x - eps * d, t, text)) * w).sum() / (2 * eps)

    # Norms, RoPE and modulation run in float32 inside the model whatever the input dtype, so a
    # small step drowns in rounding; Richardson extrapolation of two larger steps cancels the
    # O(eps^2) error instead.
    fd = (4 * central_difference(1e-2) - central_difference(2e-2)) / 3
    torch.testing.assert_close((xi.grad * d).sum(), fd, rtol=1e-4, atol=0)
    # block-causal backward: the first frame's output does not depend on later frames
    xj = x.clone().requires_grad_()
    model(xj, t, text)[:, :, 0].sum().backward()
    assert xj.grad[:, :, 1:].abs().max() == 0 and xj.grad[:, :, 0].abs().max() > 0


def test_cached_block_gradient_equals_masked(weights):
    """The first block under grad (cross K/V cached earlier without grad) has the masked path's
    gradient, including the text embedding and cross-attention k/v weights."""
    x, t, text = inputs(2, batch=1)
    ref_model, model = causal(weights, 2), causal(weights, 2)
    (ref_model(x, t, text) ** 2).sum().backward()
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model.forward_block(x, t, text, cache, 0)  # fills the cross-attention cache without grad
    (model.forward_block(x, t, None, cache, 0) ** 2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert model.blocks[0].cross_attn.k.weight.grad.abs().max() > 0


def self_forcing_step(model, x, t, text, grad_block):
    """Rollout with one block under grad, each block refreshed at t=0, then backward."""
    n = model.num_frame_per_block
    cache = model.new_cache(1, x.shape[2])
    kept = None
    for s in range(0, x.shape[2], n):
        with torch.set_grad_enabled(s == grad_block * n):
            out = model.forward_block(x[:, :, s:s + n], t[:, s:s + n], text, cache, s)
        if s == grad_block * n:
            kept = out
        with torch.no_grad():
            model.forward_block(x[:, :, s:s + n] - out.detach(), torch.zeros(1, n), None, cache, s)
    (kept ** 2).sum().backward()
    return [p.grad.clone() for p in model.parameters()], cache


def test_cached_gradient_survives_refresh_eviction_and_checkpointing(weights):
    x, t, text = inputs(6, batch=1)
    plain = causal(weights, 1, window=2, sinks=1)
    ckpt = causal(weights, 1, window=2, sinks=1)
    ckpt.activation_checkpointing = True
    grads, cache = self_forcing_step(plain, x, t, text, grad_block=2)
    grads_ckpt, _ = self_forcing_step(ckpt, x, t, text, grad_block=2)
    assert cache.evicted  # frame 2's slot was reused before backward ran
    for g, h in zip(grads, grads_ckpt):
        torch.testing.assert_close(h, g, rtol=1e-6, atol=1e-7)
    # backward right after the grad block (nothing overwritten yet) gives the same gradient
    direct = causal(weights, 1, window=2, sinks=1)
    cache = direct.new_cache(1, 6)
    with torch.no_grad():
        for s in range(2):
            out = direct.forward_block(x[:, :, s:s + 1], t[:, s:s + 1], text, cache, s)
            direct.forward_block(x[:, :, s:s + 1] - out, torch.zeros(1, 1), None, cache, s)
    (direct.forward_block(x[:, :, 2:3], t[:, 2:3], None, cache, 2) ** 2).sum().backward()
    for g, p in zip(grads, direct.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


# --- head shards ----------------------------------------------------------------------------------

def test_cache_holds_whatever_heads_the_layer_produces():
    """Two head shards with their own caches (tensor / Ulysses parallel ranks) give the
    full-head result; each cache holds its shard."""
    g = torch.Generator().manual_seed(0)
    T, H, D = 4, 4, 8
    fn = CausalSelfAttentionFn(0)
    full = KVCache(1, 1, 3)
    shards = [KVCache(1, 1, 3), KVCache(1, 1, 3)]
    for s in range(3):
        q, k, v = (torch.randn(1, T, H, D, generator=g) for _ in range(3))
        w = full.plan_block(s, 1, T, "cpu")
        ref = fn(q, k, v, kv_cache_write=w)
        full.commit(w)
        parts = []
        for r, c in enumerate(shards):
            w = c.plan_block(s, 1, T, "cpu")
            h = slice(2 * r, 2 * r + 2)
            parts.append(fn(q[:, :, h], k[:, :, h], v[:, :, h], kv_cache_write=w))
            c.commit(w)
        torch.testing.assert_close(torch.cat(parts, dim=2), ref, rtol=0, atol=1e-6)
    assert tuple(shards[0].k[0].shape) == (1, 3 * T, 2, D)
    torch.testing.assert_close(torch.cat([c.k[0] for c in shards], dim=2), full.k[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no attention mask"):
        fn(q, k, v, kv_cache_write=full.plan_block(2, 1, T, "cpu"), key_lens=torch.tensor([3]))


def _tp2_worker(rank, world, weights, x, t, text, want):
    md.initialize(tp=2, backend="gloo")
    model = parallelize_wan(causal(weights, 1, window=2, sinks=1), md.get_tp_group())
    assert model.blocks[0].self_attn.q.weight.shape[0] == CFG.dim // 2
    with torch.no_grad():
        masked = model(x, t, text)
        cached, cache = rollout(model, x, t, text, model.new_cache(x.shape[0]))
    torch.testing.assert_close(masked, want, **TOL)
    torch.testing.assert_close(cached, want, **TOL)
    assert cache.evicted and tuple(cache.k[0].shape) == (2, 3 * 16, CFG.num_heads // 2, CFG.head_dim)
    assert tuple(cache.cross_v[1].shape) == (2, CFG.text_len, CFG.num_heads // 2, CFG.head_dim)


def test_tensor_parallel_caches_hold_the_head_shard(weights):
    x, t, text = inputs(5)
    with torch.no_grad():
        want = causal(weights, 1, window=2, sinks=1)(x, t, text)
    spawn(_tp2_worker, 2, weights, x, t, text, want)


def _sp2_worker(rank, world, weights, x, t, text, w, want, want_grads, x_odd, t_odd, want_odd):
    from megadistill.models.wan.parallel import allreduce_sequence_parallel_grads

    md.initialize(sp=2, backend="gloo")
    model = parallelize_wan(causal(weights, 1, window=2, sinks=1), None, md.get_sp_group())
    with torch.no_grad():
        cached, cache = rollout(model, x, t, text, model.new_cache(x.shape[0]))
        # 9 tokens per frame: the 45-token clip is padded to 46 and chunks split frames
        torch.testing.assert_close(model(x_odd, t_odd, text), want_odd, **TOL)
        with pytest.raises(ValueError, match="no attention mask"):  # a 9-token block would be padded
            model.forward_block(x_odd[:, :, :1], t_odd[:, :1], text, model.new_cache(2), 0)
    torch.testing.assert_close(cached, want, **TOL)
    assert cache.evicted and tuple(cache.k[0].shape) == (2, 3 * 16, CFG.num_heads // 2, CFG.head_dim)
    (model(x, t, text) * w).sum().backward()
    allreduce_sequence_parallel_grads(model, md.get_sp_group())
    for name, p in model.named_parameters():
        scale = max(1.0, want_grads[name].abs().max().item())  # sums of thousands of terms, reordered
        torch.testing.assert_close(p.grad, want_grads[name], rtol=0, atol=1e-5 * scale, msg=name)


def test_ulysses_sequence_parallel_paths_and_gradients(weights):
    x, t, text = inputs(5)
    x_odd, t_odd, _ = inputs(5, seed=3)
    x_odd = x_odd[:, :, :, :6, :6]
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    model = causal(weights, 1, window=2, sinks=1)
    (model(x, t, text) * w).sum().backward()
    with torch.no_grad():
        want, want_odd = model(x, t, text), model(x_odd, t_odd, text)
    grads = {n: p.grad for n, p in model.named_parameters()}
    spawn(_sp2_worker, 2, weights, x, t, text, w, want, grads, x_odd, t_odd, want_odd)


# --- checkpoints ----------------------------------------------------------------------------------

def test_from_pretrained_reads_wan_checkpoints(tmp_path, weights):
    bidi = WanDiT(CFG)
    bidi.load_state_dict(weights)
    bidi.save_pretrained(tmp_path / "ckpt", format="native")
    model = CausalWanDiT.from_pretrained(tmp_path / "ckpt", num_frame_per_block=2, local_window_frames=4,
                                         sink_frames=1)
    assert (model.num_frame_per_block, model.local_window_frames, model.sink_frames) == (2, 4, 1)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    x, t, text = inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, text), causal(weights, 2, 4, 1)(x, t, text),
                                   rtol=0, atol=0)


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(weights):
    model = causal(weights, 2)
    x, t, text = inputs(6)
    with pytest.raises(ValueError, match="not a multiple of num_frame_per_block"):
        model(x[:, :, :5], t[:, :5], text)
    with pytest.raises(ValueError, match="per-frame timestep has 5 entries"):
        model(x, t[:, :5], text)
    cache = model.new_cache(2, 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="first forward_block of a prompt needs its text"):
            model.forward_block(x[:, :, :2], t[:, :2], None, cache, 0)
        with pytest.raises(ValueError, match="not at a block boundary"):
            model.forward_block(x[:, :, :2], t[:, :2], text, cache, 1)
        with pytest.raises(ValueError, match="a block has num_frame_per_block=2"):
            model.forward_block(x[:, :, :3], t[:, :3], text, cache, 0)
        with pytest.raises(ValueError, match="leaves a gap"):
            model.forward_block(x[:, :, :2], t[:, :2], text, cache, 2)
        with pytest.raises(ValueError, match="batch 1, the cache was made for batch 2"):
            model.forward_block(x[:1, :, :2], t[:1, :2], text[:1], cache, 0)
        model.forward_block(x[:, :, :2], t[:, :2], text, cache, 0)
        model.forward_block(x[:, :, 2:4], t[:, 2:4], text, cache, 2)
        with pytest.raises(ValueError, match="overflow.*max_frames=4"):
            model.forward_block(x[:, :, 4:6], t[:, 4:6], text, cache, 4)
        with pytest.raises(ValueError, match="text differs"):
            model.forward_block(x[:, :, 2:4], t[:, 2:4], text + 1, cache, 2)
        with pytest.raises(ValueError, match="tokens per frame"):
            model.forward_block(torch.randn(2, 16, 2, 4, 4), t[:, 2:4], text, cache, 2)
        with pytest.raises(ValueError, match="another layer count / window"):
            model.forward_block(x[:, :, :2], t[:, :2], text, causal(weights, 2, 2).new_cache(2), 0)
        windowed = causal(weights, 1, window=2)
        wcache = windowed.new_cache(2)
        for s in range(4):
            windowed.forward_block(x[:, :, s:s + 1], t[:, s:s + 1], text, wcache, s)
        with pytest.raises(ValueError, match="evicted"):
            windowed.forward_block(x[:, :, 1:2], t[:, 1:2], None, wcache, 1)
        windowed.forward_block(x[:, :, 3:4], t[:, 3:4], None, wcache, 3)  # the latest block is fine
    with pytest.raises(ValueError, match="needs max_frames"):
        model.new_cache(2)
    with pytest.raises(ValueError, match="smaller than num_frame_per_block"):
        CausalWanDiT(CFG, num_frame_per_block=3, local_window_frames=2)
    with pytest.raises(ValueError, match="need local_window_frames"):
        CausalWanDiT(CFG, num_frame_per_block=3, sink_frames=1)
    with pytest.raises(ValueError, match="num_frame_per_block must be >= 1"):
        CausalWanDiT(CFG, num_frame_per_block=0)


def test_replaced_attn_fn_is_detected(weights):
    from megadistill.kernels import attention

    def cacheless(q, k, v, kv_cache_write=None, **kwargs):  # a wrapper that dropped the cache function
        return attention(q, k, v, **kwargs)

    model = causal(weights, 1)
    model.blocks[1].self_attn.attn_fn = cacheless
    x, t, text = inputs(1)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"layers \[1\] did not write the KV cache"):
        model.forward_block(x, t, text, model.new_cache(2, 1), 0)
