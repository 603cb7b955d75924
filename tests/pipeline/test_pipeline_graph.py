import pytest

from megadistill.pipeline.graph import (BACKWARD, FORWARD, FORWARD_NOGRAD, GraphError, Op, OpGraph,
                                        dmd2_critic_graph, dmd2_generator_graph, self_forcing_critic_graph,
                                        self_forcing_generator_graph)


def test_dmd2_generator_graph_ops_and_deps():
    g = dmd2_generator_graph(3)
    assert len(g) == 3 * 7
    assert g.num_microbatches == 3
    assert g.trainable_roles == ("student", "critic")
    assert g.steps == ("student.rollout", "teacher.cond", "teacher.uncond", "critic.fake", "student.backward",
                       "critic.denoise", "critic.backward")
    bwd = g["mb1/student.backward"]
    assert bwd.kind == BACKWARD and bwd.forward_of == "mb1/student.rollout"
    assert set(bwd.deps) == {"mb1/student.rollout", "mb1/teacher.cond", "mb1/teacher.uncond", "mb1/critic.fake"}
    assert g["mb2/teacher.uncond"].kind == FORWARD_NOGRAD and g["mb2/teacher.uncond"].deps == ("mb2/student.rollout",)
    assert g["mb0/critic.denoise"].kind == FORWARD and g["mb0/critic.denoise"].deps == ("mb0/student.rollout",)


def test_dmd2_generator_turn_only_and_no_cfg():
    g = dmd2_generator_graph(2, update_critic=False, cfg=False)
    assert g.steps == ("student.rollout", "teacher.cond", "critic.fake", "student.backward")
    assert g.trainable_roles == ("student",)


def test_dmd2_critic_graph():
    g = dmd2_critic_graph(2)
    assert [op.kind for op in g.ops[:3]] == [FORWARD_NOGRAD, FORWARD, BACKWARD]
    assert g.trainable_roles == ("critic",)
    assert g["mb1/critic.denoise"].deps == ("mb1/student.rollout",)


def test_self_forcing_generator_graph_structure():
    g = self_forcing_generator_graph(2, num_blocks=3, num_denoise_steps=4, exit_step=2, block_tokens=10)
    # per microbatch: 3 blocks x 3 steps (0..exit) + 2 cache writes + teacher x2 + critic + 3 backwards
    assert len(g) == 2 * (9 + 2 + 3 + 3)
    graded = [op for op in g.ops if op.kind == FORWARD and op.microbatch == 0]
    assert [op.step for op in graded] == ["student.block0.step2", "student.block1.step2", "student.block2.step2"]
    assert g["mb0/student.block1.step0"].stage_deps == ("mb0/student.block0.cache",)
    assert g["mb0/student.block1.step1"].deps == ("mb0/student.block1.step0",)
    assert g["mb0/student.block2.step0"].kv_tokens == 30 and g["mb0/student.block2.step0"].tokens == 10
    assert "mb0/student.block2.cache" not in g.by_name  # nothing reads the last block's cache
    assert g["mb0/teacher.cond"].tokens == 30
    assert set(g["mb0/teacher.cond"].deps) == {f"mb0/student.block{k}.step2" for k in range(3)}
    assert g["mb1/student.block1.backward"].forward_of == "mb1/student.block1.step2"


def test_self_forcing_critic_graph_has_no_student_grad():
    g = self_forcing_critic_graph(1, num_blocks=2, num_denoise_steps=2)
    assert all(op.kind == FORWARD_NOGRAD for op in g.ops if op.role == "student")
    assert g.trainable_roles == ("critic",)


@pytest.mark.parametrize("build,match", [
    (lambda: OpGraph((Op("s", FORWARD, 0, "a", deps=("mb0/b",)),)), "not an op listed before"),
    (lambda: OpGraph((Op("s", FORWARD_NOGRAD, 0, "a"), Op("s", FORWARD_NOGRAD, 0, "a"))), "duplicate"),
    (lambda: OpGraph((Op("s", FORWARD, 0, "a"),)), "exactly one"),
    (lambda: OpGraph((Op("s", FORWARD_NOGRAD, 0, "a"), Op("s", BACKWARD, 0, "b", forward_of="mb0/a"))),
     "must differentiate a forward"),
    (lambda: Op("s", "sideways", 0, "a"), "kind"),
    (lambda: Op("s", BACKWARD, 0, "a"), "forward_of"),
    (lambda: dmd2_generator_graph(0), "num_microbatches"),
    (lambda: self_forcing_generator_graph(1, num_denoise_steps=2, exit_step=2), "exit_step"),
])
def test_malformed_graphs_raise(build, match):
    with pytest.raises(GraphError, match=match):
        build()
