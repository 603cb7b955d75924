"""The Wan DiT under tp2, sp2 (Ulysses) and tp2 x sp2 on gloo, against one process: forward output,
every parameter's gradient and one AdamW step; the collectives of one block against the analytic
count; from_pretrained of this rank's shard and save_pretrained under tp.

Sizes: preset "tiny" (dim 128, 4 heads of 32, ffn 256, 2 layers, text_len 32), fp32, batch 2."""
import copy
import math

import pytest
import torch
import torch.distributed as dist

import megadistill.distributed as md
from megadistill.models.wan import WanDiT
from megadistill.models.wan.checkpoint import open_wan_checkpoint, save_wan_checkpoint
from megadistill.models.wan.parallel import (ParallelWanDiT, _local_rope, _local_time, chunk_bounds, local_chunk,
                                             parallelize_wan, patchify)

from _wan_reference import SHAPES, assert_close, check_layout, make_inputs, reference_step, tiny_model, tp_slice
from _dist_spawn import spawn

F32 = 4  # bytes per element


def tp_block_traffic(b: int, s: int, text_len: int, dim: int) -> dict:
    """All-reduces over tp of one block, fp32, for ``s`` tokens per rank (the whole sequence, or the
    rank's chunk under sp) and ``text_len`` text tokens; ``C = dim``.

    forward, 7 calls: the row layers' partial sums ``self_attn.o, cross_attn.o, ffn.2`` ([B, s, C] each)
      and the TPRMSNorm sums of squares of self q, self k, cross q ([B, s, 1]) and cross k ([B, L, 1]):
      bytes = 4 * (3*B*s*C + 3*B*s + B*L).
    backward, 11 calls: each column layer's input gradient (copy_to_group): self q, k, v and cross q and
      ffn.0 ([B, s, C] each), cross k and v ([B, L, C] each); the four sums of squares again:
      bytes = 4 * (5*B*s*C + 2*B*L*C + 3*B*s + B*L).
    """
    return {"fwd_calls": 7, "fwd_bytes": F32 * (3 * b * s * dim + 3 * b * s + b * text_len),
            "bwd_calls": 11, "bwd_bytes": F32 * (5 * b * s * dim + 2 * b * text_len * dim + 3 * b * s + b * text_len)}


def ulysses_block_traffic(b: int, n: int, local_heads: int, head_dim: int) -> dict:
    """All-to-alls over sp of one block, fp32: forward 4 (q, k, v to head shards, the output back),
    backward 4; each moves the rank's local tensor [B, n, H/tp, D] (of which (sp-1)/sp leaves the rank)."""
    one = F32 * b * n * local_heads * head_dim
    return {"fwd_calls": 4, "fwd_bytes": 4 * one, "bwd_calls": 4, "bwd_bytes": 4 * one}


def block_inputs(par: ParallelWanDiT, x, t, text, sp_group):
    """The inputs one block of ``par`` sees for this rank's tokens (leaves that require grad)."""
    grid = par.token_grid(x)
    num_tokens = math.prod(grid)
    start, n, _ = chunk_bounds(num_tokens, 0 if sp_group is None else dist.get_rank(sp_group),
                               1 if sp_group is None else dist.get_world_size(sp_group))
    with torch.no_grad():
        h = par.embed_patches(local_chunk(patchify(x, par.config.patch_size), sp_group))
        e, e0 = par.embed_time(t, x.shape[0])
        e0 = _local_time(e, e0, grid, start, n)[1]
        context = par.embed_text(text)
    rope = _local_rope(par.config, grid, x.device, start, n)
    kwargs = {"valid_len": num_tokens} if sp_group is not None else None
    return h.requires_grad_(), e0, context.requires_grad_(), rope, kwargs


def count_block(par, inputs, sp_group):
    h, e0, context, rope, kwargs = block_inputs(par, *inputs[:3], sp_group)
    with md.count_collectives() as fwd:
        y = par.blocks[0](h, e0, context, rope, kwargs)
    with md.count_collectives() as bwd:
        y.square().sum().backward()
    return fwd, bwd, h.shape[1]


def check_traffic(counts, expected: dict, kind: str, group: str, what: str):
    fwd, bwd = counts
    for phase, c in (("fwd", fwd), ("bwd", bwd)):
        got = (c.calls(kind, group), c.bytes(kind, group))
        want = (expected[f"{phase}_calls"], expected[f"{phase}_bytes"])
        assert got == want, f"{what} {phase} {kind}/{group}: (calls, bytes) {got} != {want}\n{c.summary()}"


# --- 2 processes: Ulysses sp2 ------------------------------------------------------------------------

def _sp2_worker(rank, world):
    md.initialize(sp=2)
    sp = md.get_sp_group()
    model = tiny_model()
    cfg = model.config
    for shape, per_frame in (("odd", True), ("aligned", True), ("odd", False)):
        inputs = make_inputs(SHAPES[shape], per_frame)
        ref = reference_step(model, *inputs[:4])
        par = check_layout(model, None, sp, inputs, ref, f"sp2 {shape} per_frame={per_frame}")

    # one block: 4 all-to-alls forward and 4 backward, nothing else
    inputs = make_inputs(SHAPES["odd"], per_frame=True)
    par = parallelize_wan(copy.deepcopy(model), None, sp)
    fwd, bwd, n = count_block(par, inputs, sp)
    assert n == 5  # 9 tokens over 2 ranks: chunks of 5, the last one padded
    assert fwd.calls() == 4 and bwd.calls() == 4, fwd.summary() + "\n" + bwd.summary()
    check_traffic((fwd, bwd), ulysses_block_traffic(2, n, cfg.num_heads, cfg.head_dim), "all_to_all", "sp", "sp2")

    # the whole model: 4 all-to-alls per block plus one all-gather of the output tokens forward
    with md.count_collectives() as whole:
        out = par(*inputs[:3])
    assert whole.calls("all_to_all", "sp") == 4 * cfg.num_layers and whole.calls("all_gather", "sp") == 1
    assert whole.calls() == 4 * cfg.num_layers + 1
    assert whole.bytes("all_gather", "sp") == F32 * 2 * n * cfg.patch_out
    with md.count_collectives() as whole_bwd:
        out.square().sum().backward()
    assert whole_bwd.calls() == whole_bwd.calls("all_to_all", "sp") == 4 * cfg.num_layers


def test_sp2_matches_single_process():
    spawn(_sp2_worker, 2)


# --- 4 processes: tp2, sp2 and tp2 x sp2 on one grid; checkpoints ------------------------------------

def _write_checkpoints(model: WanDiT, root):
    """Rank 0 writes the model in every format (megadistill at tp 1 and tp 4)."""
    if dist.get_rank() == 0:
        for fmt in ("native", "diffusers", "megadistill"):
            model.save_pretrained(f"{root}/{fmt}", format=fmt)
        save_wan_checkpoint(model.state_dict(), f"{root}/megadistill-tp4", format="megadistill",
                            config=model.config, tp=4)
    dist.barrier()


def _tp2_sp2_worker(rank, world, root):
    md.initialize(tp=2, sp=2)
    tp, sp = md.get_tp_group(), md.get_sp_group()
    model = tiny_model()
    cfg = model.config

    inputs = make_inputs(SHAPES["odd"], per_frame=True)
    ref = reference_step(model, *inputs[:4])
    check_layout(model, tp, None, inputs, ref, "tp2")
    check_layout(model, None, sp, inputs, ref, "sp2 (in a 4-rank world)")
    par = check_layout(model, tp, sp, inputs, ref, "tp2 x sp2 odd per-frame")
    aligned = make_inputs(SHAPES["aligned"], per_frame=False)
    check_layout(model, tp, sp, aligned, reference_step(model, *aligned[:4]), "tp2 x sp2 aligned")

    # heads are split across tp: each rank projects 2 of the 4 heads
    assert par.blocks[0].self_attn.q.weight.shape == (cfg.dim // 2, cfg.dim)
    assert par.blocks[0].cross_attn.o.weight.shape == (cfg.dim, cfg.dim // 2)

    # traffic of one block under tp2 (whole sequence) and tp2 x sp2 (chunks of 5 of 9 tokens)
    tp_only = parallelize_wan(copy.deepcopy(model), tp, None)
    fwd, bwd, s = count_block(tp_only, inputs, None)
    assert fwd.calls() == 7 and bwd.calls() == 11, fwd.summary() + "\n" + bwd.summary()
    check_traffic((fwd, bwd), tp_block_traffic(2, s, cfg.text_len, cfg.dim), "all_reduce", "tp", "tp2")
    both = parallelize_wan(copy.deepcopy(model), tp, sp)
    fwd, bwd, n = count_block(both, inputs, sp)
    assert n == 5 and fwd.calls() == 7 + 4 and bwd.calls() == 11 + 4
    check_traffic((fwd, bwd), tp_block_traffic(2, n, cfg.text_len, cfg.dim), "all_reduce", "tp", "tp2 x sp2")
    check_traffic((fwd, bwd), ulysses_block_traffic(2, n, cfg.num_heads // 2, cfg.head_dim), "all_to_all", "sp",
                  "tp2 x sp2")

    # from_pretrained under the grid: meta -> tp2 x sp2 layers -> this rank's shard, from every format
    _write_checkpoints(model, root)
    full = model.state_dict()
    for fmt in ("native", "diffusers", "megadistill", "megadistill-tp4"):
        loaded = WanDiT.from_pretrained(f"{root}/{fmt}")
        assert isinstance(loaded, ParallelWanDiT) and loaded.tp_group is tp and loaded.sp_group is sp, fmt
        for name, p in loaded.named_parameters():
            assert not p.is_meta and torch.equal(p.detach(), tp_slice(name, full[name], tp)), f"{fmt} {name}"
            if name.endswith("self_attn.q.weight"):
                assert p.tensor_model_parallel and p.partition_dim == 0
        with torch.no_grad():
            assert_close(loaded(*inputs[:3]), ref.out, f"forward after loading {fmt}")

    # save_pretrained under tp gathers the shards; rank 0 writes a tp=1 checkpoint
    for fmt in ("native", "megadistill"):
        loaded.save_pretrained(f"{root}/saved-{fmt}", format=fmt)
        with open_wan_checkpoint(f"{root}/saved-{fmt}") as ckpt:
            assert ckpt.format == fmt and ckpt.config == cfg
            for name, t in full.items():
                assert torch.equal(ckpt.load(name), t), f"saved {fmt}: {name}"
    try:
        loaded.save_pretrained(f"{root}/saved-native", format="native")
        raise AssertionError("expected FileExistsError on every rank")
    except FileExistsError as e:
        assert "exists" in str(e)


def test_tp2_sp2_matches_single_process_and_loads_shards(tmp_path):
    spawn(_tp2_sp2_worker, 4, str(tmp_path))


# --- single process ---------------------------------------------------------------------------------

def test_layout_errors_and_trivial_layout():
    model = tiny_model()
    inputs = make_inputs(SHAPES["odd"], per_frame=True)
    same = parallelize_wan(copy.deepcopy(model))  # no groups: the sharded forward on one rank
    assert isinstance(same, ParallelWanDiT)
    with torch.no_grad():
        assert_close(same(*inputs[:3]), model(*inputs[:3]), "no groups")
    with pytest.raises(NotImplementedError, match="Ulysses"):
        parallelize_wan(copy.deepcopy(model), sequence_parallel=True)
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize_wan(same)
