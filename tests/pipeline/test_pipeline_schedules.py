import dataclasses

import pytest
from pipeline_helpers import train_graph

from megadistill.pipeline.costs import WAN_1_3B, WAN_14B, FlopsCostModel, UnitCostModel
from megadistill.pipeline.graph import (BACKWARD, dmd2_critic_graph, dmd2_generator_graph, self_forcing_critic_graph,
                                        self_forcing_generator_graph)
from megadistill.pipeline.instructions import RECVS, SENDS, Compute, OptimizerStep, RecvActivation, RecvGrad
from megadistill.pipeline.schedules import (SCHEDULES, build_schedule, format_schedule, interleaved_schedule,
                                            sequential_schedule, validate_schedule)
from megadistill.pipeline.simulator import ScheduleError, simulate

GRAPHS = {
    "dmd2_generator": lambda m: dmd2_generator_graph(m),
    "dmd2_generator_turn": lambda m: dmd2_generator_graph(m, update_critic=False),
    "dmd2_critic": lambda m: dmd2_critic_graph(m),
    "self_forcing_generator": lambda m: self_forcing_generator_graph(m, num_blocks=2, num_denoise_steps=3,
                                                                     block_tokens=8),
    "self_forcing_critic": lambda m: self_forcing_critic_graph(m, num_blocks=2, num_denoise_steps=2, block_tokens=8),
    "train": train_graph,
}
FLOPS = FlopsCostModel(roles={"student": WAN_1_3B, "critic": WAN_1_3B, "teacher": WAN_14B})


def _check_structure(schedule):
    """Independent of validate_schedule: every op once per stage, sends == receives in order."""
    names = [op.name for op in schedule.graph.ops]
    sent, received = {}, {}
    for s, instrs in enumerate(schedule.stages):
        computed = [i.op for i in instrs if isinstance(i, Compute)]
        assert sorted(computed) == sorted(names), f"stage {s}"
        for i in instrs:
            if isinstance(i, SENDS):
                sent.setdefault((i.message.src, i.message.dst), []).append(i.message)
            if isinstance(i, RECVS):
                received.setdefault((i.message.src, i.message.dst), []).append(i.message)
        steps = [i.role for i in instrs if isinstance(i, OptimizerStep)]
        assert sorted(steps) == sorted(schedule.graph.trainable_roles)
    assert sent == received


@pytest.mark.parametrize("graph_name", sorted(GRAPHS))
@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("microbatches", [1, 3, 8])
@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_are_valid(graph_name, stages, microbatches, name):
    if graph_name.startswith("self_forcing") and microbatches == 8:
        microbatches = 5  # keep the suite fast
    graph = GRAPHS[graph_name](microbatches)
    schedule = build_schedule(name, graph, stages)  # validates (incl. deadlock-free replay)
    _check_structure(schedule)
    if stages == 1:
        assert not any(isinstance(i, SENDS + RECVS) for i in schedule.stages[0])


@pytest.mark.parametrize("graph_name", ["dmd2_generator", "self_forcing_generator"])
def test_interleaved_under_flops_costs_is_valid(graph_name):
    schedule = build_schedule("interleaved", GRAPHS[graph_name](4), 4, FLOPS)
    _check_structure(schedule)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("graph_name", sorted(GRAPHS))
def test_one_stage_runs_the_graph_in_order(name, graph_name):
    graph = GRAPHS[graph_name](3)
    schedule = build_schedule(name, graph, 1)
    computes = [i.op for i in schedule.stages[0] if isinstance(i, Compute)]
    assert computes == [op.name for op in graph.ops]


def test_sequential_training_pass_is_1f1b():
    schedule = sequential_schedule(train_graph(4), 3)
    order = [("F" if i.kind != BACKWARD else "B") + str(i.microbatch)
             for i in schedule.stages[0] if isinstance(i, Compute)]
    assert order == ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    last = [("F" if i.kind != BACKWARD else "B") + str(i.microbatch)
            for i in schedule.stages[2] if isinstance(i, Compute)]
    assert last == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


def test_sequential_hands_inputs_over_at_pass_start():
    """The teacher's uncond pass takes the student sample only after the cond pass left the last stage."""
    schedule = sequential_schedule(dmd2_generator_graph(2, update_critic=False), 2)
    last = [str(i) for i in schedule.stages[1]]
    first_uncond_send = next(k for k, line in enumerate(last) if "=> mb0/teacher.uncond" in line)
    last_cond = max(k for k, line in enumerate(last) if "teacher.cond" in line and line.startswith("forward"))
    assert first_uncond_send > last_cond


def test_optimizer_step_follows_last_use_of_role():
    schedule = interleaved_schedule(dmd2_generator_graph(3), 2, FLOPS)
    for instrs in schedule.stages:
        for role in ("student", "critic"):
            step = next(k for k, i in enumerate(instrs) if isinstance(i, OptimizerStep) and i.role == role)
            last = max(k for k, i in enumerate(instrs) if isinstance(i, Compute) and i.role == role)
            # critic.fake (no grad) also runs before the critic's update; only sends in between
            assert step > last and all(isinstance(i, SENDS) for i in instrs[last + 1:step])


def _replace(schedule, stage, instrs):
    stages = list(schedule.stages)
    stages[stage] = tuple(instrs)
    return dataclasses.replace(schedule, stages=tuple(stages))


def test_validator_rejects_swapped_receives():
    schedule = sequential_schedule(train_graph(2), 2)
    instrs = list(schedule.stages[1])
    recvs = [k for k, i in enumerate(instrs) if isinstance(i, RecvActivation)]
    instrs[recvs[0]], instrs[recvs[1]] = instrs[recvs[1]], instrs[recvs[0]]
    with pytest.raises(ScheduleError):
        validate_schedule(_replace(schedule, 1, instrs))


def test_validator_rejects_compute_before_receive():
    schedule = sequential_schedule(train_graph(1), 2)
    instrs = list(schedule.stages[0])
    k = next(k for k, i in enumerate(instrs) if isinstance(i, RecvGrad))
    instrs[k], instrs[k + 1] = instrs[k + 1], instrs[k]
    with pytest.raises(ScheduleError, match="before receiving"):
        validate_schedule(_replace(schedule, 0, instrs))


def test_validator_rejects_missing_and_repeated_ops():
    schedule = sequential_schedule(train_graph(2), 2)
    instrs = [i for i in schedule.stages[1] if not (isinstance(i, Compute) and i.op == "mb1/student.backward")]
    with pytest.raises(ScheduleError):
        validate_schedule(_replace(schedule, 1, instrs))
    instrs = list(schedule.stages[0]) + [schedule.stages[0][0]]
    with pytest.raises(ScheduleError, match="twice"):
        validate_schedule(_replace(schedule, 0, instrs))


def test_validator_detects_deadlock():
    """Stage 0 waits for the gradient before it sends the activation stage 1 waits for."""
    schedule = sequential_schedule(train_graph(1), 2)
    instrs = list(schedule.stages[0])
    k = next(k for k, i in enumerate(instrs) if isinstance(i, RecvGrad))
    bad = _replace(schedule, 0, [instrs[k]] + instrs[:k] + instrs[k + 1:])
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(bad, UnitCostModel())
    with pytest.raises(ScheduleError):
        validate_schedule(bad)


def test_memory_cap_count_is_respected():
    graph = dmd2_generator_graph(8)
    free = simulate(interleaved_schedule(graph, 4), UnitCostModel())
    assert max(free.peak_activation_bytes_per_stage) > 2  # the cap below binds
    capped = simulate(build_schedule("interleaved", graph, 4, max_inflight_activations=2), UnitCostModel())
    assert max(capped.peak_activation_bytes_per_stage) <= 2


def test_memory_cap_bytes_is_respected_under_flops_costs():
    graph = self_forcing_generator_graph(6, num_blocks=3, num_denoise_steps=2, block_tokens=4680)
    group = 3 * FLOPS.held_activation_bytes(graph["mb0/student.block0.step1"], 0, 4)
    cap = int(2.5 * group)
    free = simulate(interleaved_schedule(graph, 4, FLOPS), FLOPS)
    assert max(free.peak_activation_bytes_per_stage) > cap
    capped = simulate(build_schedule("interleaved", graph, 4, FLOPS, max_activation_bytes=cap), FLOPS)
    assert max(capped.peak_activation_bytes_per_stage) <= cap
    with pytest.raises(ScheduleError, match="below"):
        interleaved_schedule(graph, 4, FLOPS, max_activation_bytes=group // 2)


def test_format_schedule_lists_every_instruction():
    schedule = sequential_schedule(train_graph(2), 2)
    text = format_schedule(schedule)
    assert text.count("\n") == len(schedule.stages) + sum(len(s) for s in schedule.stages)
    assert "send_act       act(mb0/student.forward) 0->1" in text
    assert "recv_grad      grad(mb1/student.backward) 1->0" in text
    assert "optimizer_step student" in text
