import json

import pytest
from pipeline_helpers import train_graph

from megadistill.pipeline.costs import (WAN_1_3B, WAN_14B, DiTShape, FlopsCostModel, MeasuredCostModel,
                                        UnitCostModel, block_forward_flops, split_layers)
from megadistill.pipeline.graph import dmd2_critic_graph, dmd2_generator_graph
from megadistill.pipeline.schedules import build_schedule, sequential_schedule
from megadistill.pipeline.simulator import simulate
from megadistill.pipeline.trace import ascii_timeline, chrome_trace, write_chrome_trace


def test_two_stage_1f1b_unit_costs_by_hand():
    """P=2, M=2, forward 1, backward 2, free transfers. Stage 0: F0 [0,1] F1 [1,2] B0 [4,6] B1 [7,9];
    stage 1: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]. Makespan 9, busy 6 per stage, bubble 1/3."""
    r = simulate(sequential_schedule(train_graph(2), 2), UnitCostModel())
    assert r.makespan == 9.0
    assert r.busy_per_stage == (6.0, 6.0)
    assert r.bubble_fraction_per_stage == pytest.approx((1 / 3, 1 / 3))
    assert r.bubble_fraction == pytest.approx(1 / 3)
    assert r.peak_activation_bytes_per_stage == (2, 1)  # stage 0 holds F0 and F1 at once
    assert ascii_timeline(r, width=9).splitlines()[1:3] == [
        "stage  0 |SS..BB.BB| bubble 33.3%",
        "stage  1 |.SBBSBB..| bubble 33.3%",
    ]


def test_two_stage_1f1b_with_transfer_time():
    """Same with 0.5 per message: s0 F0 [0,1] F1 [1,2] B0 [5,7] B1 [8,10]; s1 F0 [1.5,2.5]
    B0 [2.5,4.5] F1 [4.5,5.5] B1 [5.5,7.5]."""
    r = simulate(sequential_schedule(train_graph(2), 2), UnitCostModel(transfer=0.5))
    assert r.makespan == 10.0
    assert [(e.stage, e.name, e.start) for e in r.events if e.kind != "optimizer_step"] == [
        (0, "mb0/student.forward", 0.0), (0, "mb1/student.forward", 1.0), (1, "mb0/student.forward", 1.5),
        (1, "mb0/student.backward", 2.5), (1, "mb1/student.forward", 4.5), (1, "mb1/student.backward", 5.5),
        (0, "mb0/student.backward", 5.0), (0, "mb1/student.backward", 8.0)]


def test_dmd2_generator_turn_one_microbatch_by_hand():
    """P=2, M=1, unit costs: student rollout s0 [0,1] s1 [1,2]. Sequential: teacher cond [2,3]/[3,4],
    uncond (input handed over after the cond pass) [4,5]/[5,6], critic [6,7]/[7,8], backward s1 [8,10]
    s0 [10,12]: makespan 12. Interleaved: the three scoring forwards back to back on s0 [2,5] and s1
    [3,6], backward [6,8]/[8,10]: makespan 10. Busy 6 per stage."""
    graph = dmd2_generator_graph(1, update_critic=False)
    seq = simulate(build_schedule("sequential", graph, 2), UnitCostModel())
    inter = simulate(build_schedule("interleaved", graph, 2), UnitCostModel())
    assert (seq.makespan, inter.makespan) == (12.0, 10.0)
    assert seq.bubble_fraction == pytest.approx(0.5)
    assert inter.bubble_fraction == pytest.approx(0.4)
    assert inter.peak_activation_bytes_per_stage == (1, 1)


def test_block_flops_formula_by_hand():
    shape = DiTShape(dim=2, ffn_dim=3, num_heads=1, num_layers=1)
    # 2*T*(4d^2 + 2d^2 + 2fd) + 4*T*K*d + 2*L*2d^2 + 4*T*L*d with T=K=5, L=7
    assert block_forward_flops(shape, 5, 5, 7) == 360 + 200 + 112 + 280
    big = block_forward_flops(WAN_14B, 32760, 32760, 512) / block_forward_flops(WAN_1_3B, 32760, 32760, 512)
    assert 4.0 < big < 5.0


def test_split_layers():
    assert split_layers(30, 4) == [8, 8, 7, 7]
    assert split_layers(40, 4) == [10, 10, 10, 10]
    with pytest.raises(ValueError, match="at most 3"):
        split_layers(3, 4)


def test_flops_cost_model_backward_is_twice_forward_and_stages_sum_to_whole():
    graph = dmd2_critic_graph(1)
    fwd = graph["mb0/critic.denoise"]
    costs = FlopsCostModel(roles={"critic": WAN_1_3B, "student": WAN_1_3B}, flops_per_second=1.0)
    whole = costs.forward_flops(fwd, 0, 1)
    assert sum(costs.forward_flops(fwd, s, 4) for s in range(4)) == pytest.approx(whole)
    assert costs.compute_seconds(graph["mb0/critic.backward"], 2, 4) == 2 * costs.compute_seconds(fwd, 2, 4)
    assert costs.held_activation_bytes(graph["mb0/student.rollout"], 0, 4) == 0  # no grad, nothing held


def test_measured_cost_model(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({
        "num_stages": 2,
        "compute_seconds": {"student": {"forward_nograd": 1.0}, "critic": {"forward": [1.0, 1.0], "backward": 2.0}},
        "activation_bytes": {"critic": [10, 20]},
        "p2p_bandwidth": 1e30, "p2p_latency": 0.0}))
    costs = MeasuredCostModel.from_json(str(path))
    # rollout s0 [0,1] s1 [1,2]; critic forward s0 [2,3] s1 [3,4]; backward s1 [4,6] s0 [6,8]
    r = simulate(sequential_schedule(dmd2_critic_graph(1), 2), costs)
    assert r.makespan == pytest.approx(8.0)
    assert r.peak_activation_bytes_per_stage == (10, 20)
    with pytest.raises(KeyError, match=r"compute_seconds\.student\.forward "):
        simulate(sequential_schedule(dmd2_generator_graph(1), 2), costs)
    with pytest.raises(ValueError, match="same pipeline size"):
        simulate(sequential_schedule(dmd2_critic_graph(1), 4), costs)
    with pytest.raises(ValueError, match="one per stage"):
        MeasuredCostModel.from_dict({"num_stages": 2, "compute_seconds": {"critic": {"forward": [1.0]}}})


def test_chrome_trace(tmp_path):
    r = simulate(sequential_schedule(train_graph(2), 2), UnitCostModel())
    trace = chrome_trace(r, "train")
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {0, 1}
    assert sum(e["dur"] for e in spans) == pytest.approx(12e6)
    path = tmp_path / "trace.json"
    write_chrome_trace([("a", r), ("b", r)], str(path))
    events = json.loads(path.read_text())["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1}


def test_bar_interleaved_bubble_at_most_a_third_of_sequential():
    """4 stages, 8 microbatches, Wan 14B teacher (40 blocks), 1.3B student and critic (30 blocks),
    FLOPs costs: the DMD2 generator step (generator update + the critic update of that iteration)."""
    costs = FlopsCostModel(roles={"student": WAN_1_3B, "critic": WAN_1_3B, "teacher": WAN_14B})
    graph = dmd2_generator_graph(8)
    seq = simulate(build_schedule("sequential", graph, 4, costs), costs)
    inter = simulate(build_schedule("interleaved", graph, 4, costs), costs)
    assert seq.bubble_fraction > 0.2
    assert inter.bubble_fraction <= seq.bubble_fraction / 3
    assert inter.makespan < seq.makespan
    assert sum(inter.busy_per_stage) == pytest.approx(sum(seq.busy_per_stage))  # same work, reordered
