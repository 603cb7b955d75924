"""tools/bench_comm.py: the bytes a training step moves under tp2 and sp2 (gloo processes), checked
against the counts worked out by hand from the layers' collectives."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_comm  # noqa: E402

C, LAYERS, TEXT = 128, bench_comm.LAYERS, bench_comm.TEXT
TOKENS = 48  # latents 2 x 8 x 12, patch (1, 2, 2)


def test_layout_parsing():
    assert bench_comm.parse_layout("dp2xsp2") == {"tp": 1, "sp": 2, "dp": 2}
    assert bench_comm.parse_layout("tp2") == {"tp": 2, "sp": 1, "dp": 1}
    with pytest.raises(ValueError, match="joined by x"):
        bench_comm.parse_layout("tp2-sp2")


def test_tp2_counts_every_all_reduce_of_the_unfused_layers():
    r = bench_comm.measure("tp2")
    tp = r["groups"]["tp"]
    # per block, fp32, all-reduce over 2 ranks moves 2 * (1/2) = 1 x the tensor:
    # forward o, cross o, ffn.2 (3 x tokens x C); backward q, k, v, cross q, ffn.0 inputs
    # (5 x tokens x C) and cross k, v over the text (2 x T x C); q/k RMSNorm sums forward and
    # backward (2 x (3 tokens + T) floats)
    per_block = (8 * TOKENS * C + 2 * TEXT * C + 2 * (3 * TOKENS + TEXT)) * 4
    assert tp["bytes_moved"] == per_block * LAYERS
    assert tp["calls"] == LAYERS * (3 + 5 + 2 + 8)
    # the fused-projection minimum is smaller: the ratio shows the separate q/k/v layers
    assert tp["ratio"] == pytest.approx(per_block * LAYERS / tp["analytic_min_bytes"])
    assert 1.3 < tp["ratio"] < 1.5
    assert r["ranks_agree"] and "dp_sp" not in r["groups"]


def test_sp2_under_zero3_matches_the_minimum(capsys):
    assert bench_comm.main(["--layouts", "sp2", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    sp, zero = r["groups"]["sp"], r["groups"]["dp_sp"]
    # Ulysses: 4 all-to-alls forward + 4 backward per block of [24 tokens, C] fp32, half of it sent
    assert sp["calls"] == 8 * LAYERS
    assert sp["bytes_moved"] == 8 * LAYERS * (TOKENS // 2) * C * 4 / 2
    assert sp["ratio"] == 1.0
    # ZeRO-3 over dp x sp = 2: parameters gathered forward and backward, gradients reduce-scattered
    # (plus a few bytes of overflow / grad-norm scalars)
    assert zero["by_kind"]["all_gather_into_tensor"]["bytes_moved"] == pytest.approx(
        2 * zero["analytic_min_bytes"] / 3, rel=1e-3)
    assert zero["ratio"] == pytest.approx(1.0, abs=1e-3)
    assert r["ranks_agree"]


def test_analytic_table_at_wan_scale():
    from megadistill.models.wan.config import get_preset
    from megadistill.train.memory import local_parameter_numels

    (row,) = bench_comm.analytic_table("wan2.1-t2v-1.3b", ["dp16xsp4"], 32760, 512, 2, forward_only=False)
    g = row["analytic_min_bytes"]
    # 8 all-to-alls per block of 8190 local tokens x 1536, bf16, 3/4 of it sent
    assert g["sp"] == 8 * 30 * 8190 * 1536 * 2 * 3 / 4
    params = sum(n for _, n in local_parameter_numels(get_preset("wan2.1-t2v-1.3b")))
    assert g["dp_sp"] == 3 * params * 2 * 63 / 64
    (fwd,) = bench_comm.analytic_table("wan2.1-t2v-14b", ["dp32xtp2"], 32760, 512, 2, forward_only=True)
    assert set(fwd["analytic_min_bytes"]) == {"tp", "dp_sp"}
    with pytest.raises(ValueError, match="heads"):
        bench_comm.analytic_table("wan2.1-t2v-1.3b", ["dp8xtp2xsp4"], 32760, 512, 2, forward_only=False)
