"""Ulysses attention on 2 gloo processes against full attention, with a sequence length that does
not divide the sp size; padding helpers; collective accounting of one self-attention."""
import pytest
import torch

import megadistill.distributed as md

from _dist_spawn import spawn


def attn(q, k, v, key_lens=None):
    """Plain softmax attention, [B, S, H, D] layout; keys at positions >= key_lens[b] are masked."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if key_lens is not None:
        valid = torch.arange(k.shape[1]).view(1, 1, 1, -1) < torch.as_tensor(key_lens).view(-1, 1, 1, 1)
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)


def test_pad_to_multiple_and_unpad():
    x = torch.randn(2, 7, 3, 4)
    padded, length = md.pad_to_multiple(x, 4, dim=1)
    assert padded.shape == (2, 8, 3, 4) and length == 7
    assert torch.equal(padded[:, :7], x) and torch.count_nonzero(padded[:, 7:]) == 0
    assert torch.equal(md.unpad(padded, length, dim=1), x)
    same, length = md.pad_to_multiple(x, 7, dim=1)
    assert same is x and length == 7
    last, _ = md.pad_to_multiple(x, 3, dim=-1)
    assert last.shape == (2, 7, 3, 6) and torch.equal(last[..., :4], x)
    with pytest.raises(ValueError, match="longer length"):
        md.unpad(x, 9, dim=1)


def test_single_process_is_plain_attention():
    q, k, v = (torch.randn(1, 5, 4, 8) for _ in range(3))
    torch.testing.assert_close(md.ulysses_attention(q, k, v, attn, None), attn(q, k, v))


def _ulysses_worker(rank, world):
    md.initialize(sp=world, backend="gloo")
    group = md.get_sp_group()
    B, S, H, D = 2, 7, 4, 8  # S = 7 does not divide sp = 2
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(B, S, H, D, generator=gen, dtype=torch.float64) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = attn(*leaves)
    (out_ref * g).sum().backward()

    shards = []
    for t in (q, k, v):
        shard, length = md.shard_sequence(t, group)
        shards.append(shard.detach().requires_grad_())
    assert length == S and shards[0].shape == (B, 4, H, D)
    g_local, _ = md.shard_sequence(g, group)

    with md.count_collectives() as fwd:
        out = md.ulysses_attention(*shards, attn, group, valid_len=length)
    assert out.shape == (B, 4, H, D)
    torch.testing.assert_close(md.gather_sequence(out, length, group), out_ref.detach(), rtol=1e-10, atol=1e-10)
    # one self-attention = 4 all-to-alls (q, k, v, output), each moving the local tensor
    assert fwd.calls() == 4 and fwd.calls("all_to_all", "sp") == 4
    assert fwd.bytes("all_to_all", "sp") == 4 * B * 4 * H * D * 8

    with md.count_collectives() as bwd:
        (out * g_local).sum().backward()
    assert bwd.calls("all_to_all", "sp") == 4 and bwd.calls() == 4
    for name, shard, leaf in zip("qkv", shards, leaves):
        ref_grad, _ = md.shard_sequence(leaf.grad, group)  # padded positions get zero gradient
        torch.testing.assert_close(shard.grad, ref_grad, rtol=1e-10, atol=1e-10, msg=f"d{name}")

    # a key_lens already given to attn_fn is combined with the padding mask by minimum
    lens = torch.tensor([5, 7])
    out = md.ulysses_attention(*(s.detach() for s in shards), attn, group, valid_len=length, key_lens=lens)
    torch.testing.assert_close(md.gather_sequence(out, length, group), attn(q, k, v, key_lens=lens))

    # heads must split over sp
    try:
        md.ulysses_attention(*(s[:, :, :3].detach() for s in shards), attn, group)
        raise AssertionError("expected a ValueError")
    except ValueError as e:
        assert "3 heads, not divisible by the sequence-parallel size 2" in str(e)


def test_ulysses_equals_full_attention_two_processes():
    spawn(_ulysses_worker, 2)
