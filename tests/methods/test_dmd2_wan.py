"""DMD2 on tiny Wan DiTs through the Wan adapter."""
import math

import pytest
import torch

from megadistill.methods import DMD2Method, ModelBundle, RoleError
from megadistill.pipeline.graph import BACKWARD, FORWARD, FORWARD_NOGRAD

from methods_helpers import changed, snapshot, tiny_wan_bundle, wan_adapter, wan_batch

CONFIG = {"guidance_scale": 3.0, "guidance_convention": "dmd", "generator_update_interval": 2}


def record_calls(bundle):
    """Forward hooks: (role, grad enabled, output) per call, in call order."""
    calls = []
    for name in ("student", "teacher", "critic"):
        if name in bundle:
            bundle[name].module.register_forward_hook(
                lambda mod, args, out, name=name: calls.append((name, torch.is_grad_enabled(), args, out)))
    return calls


def first_step_with_exit(method, index):
    step = next(s for s in range(0, 200, method.config.generator_update_interval) if method.exit_index(s) == index)
    return step


def test_rollout_gradient_flows_only_through_the_exit_step():
    torch.manual_seed(0)
    bundle = tiny_wan_bundle(("student", "teacher", "critic"))
    adapter = wan_adapter()
    method = DMD2Method(bundle, adapter, CONFIG)
    calls = record_calls(bundle)
    batch = adapter.prepare_batch(wan_batch())
    step = first_step_with_exit(method, 3)
    x = method.rollout(batch, method.exit_index(step), with_grad=True)
    assert [(r, g) for r, g, _, _ in calls] == [("student", False)] * 3 + [("student", True)]
    outputs_with_grad = [out for _, _, _, out in calls if out.requires_grad]
    assert len(outputs_with_grad) == 1
    exit_input = calls[-1][2][0]
    assert not exit_input.requires_grad  # the steps before the exit feed in no graph

    student = bundle["student"].module
    x.square().mean().backward()
    grads = [p.grad.clone() for p in student.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the same gradient comes from re-running the exit step alone on its recorded input
    student.zero_grad(set_to_none=True)
    t = calls[-1][2][1]
    again = adapter.predict_x0(bundle["student"], exit_input, t, batch.cond)
    assert torch.equal(again, x.detach())
    again.square().mean().backward()
    for g, p in zip(grads, student.parameters()):
        assert torch.equal(g, p.grad)


def test_dmd2_step_updates_student_and_critic_not_teacher():
    torch.manual_seed(1)
    bundle = tiny_wan_bundle()
    method = DMD2Method(bundle, wan_adapter(), CONFIG)
    before = {r: snapshot(bundle[r].module) for r in ("student", "teacher", "critic")}
    logs = method.train_step(wan_batch(), step=0)
    assert {"generator_loss", "generator_grad_norm", "dmd_grad_mean_abs", "critic_loss",
            "critic_grad_norm"} <= set(logs)
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    assert changed(bundle["student"].module, before["student"])
    assert changed(bundle["critic"].module, before["critic"])
    assert not changed(bundle["teacher"].module, before["teacher"])
    assert all(p.grad is None for r in ("student", "critic", "teacher") for p in bundle[r].module.parameters())

    before = {r: snapshot(bundle[r].module) for r in ("student", "critic")}
    logs = method.train_step(wan_batch(seed=1), step=1)  # not a generator step
    assert "generator_loss" not in logs
    assert not changed(bundle["student"].module, before["student"])
    assert changed(bundle["critic"].module, before["critic"])


def test_data_latent_mode_trains_from_data_and_needs_latents():
    torch.manual_seed(2)
    bundle = tiny_wan_bundle()
    method = DMD2Method(bundle, wan_adapter(), {"rollout_mode": "data_latent"})
    logs = method.train_step(wan_batch(with_latents=True), step=0)
    assert math.isfinite(logs["generator_loss"]) and math.isfinite(logs["critic_loss"])
    with pytest.raises(ValueError, match="no 'latents'"):
        method.train_step(wan_batch(), step=0)


@pytest.mark.parametrize("mode", ["simulate", "data_latent"])
def test_step_graph_lists_the_model_calls_of_train_step(mode):
    torch.manual_seed(3)
    bundle = tiny_wan_bundle()
    method = DMD2Method(bundle, wan_adapter(), dict(CONFIG, rollout_mode=mode))
    calls = record_calls(bundle)
    for step in (first_step_with_exit(method, 2), 1):
        del calls[:]
        method.train_step(wan_batch(with_latents=True), step)
        graphs = method.step_graph(step, num_microbatches=1)
        expected = [(op.role, op.kind == FORWARD) for g in graphs for op in g.ops if op.kind != BACKWARD]
        assert [(r, g) for r, g, _, _ in calls] == expected
        assert [g.trainable_roles for g in graphs] == ([("student",), ("critic",)] if step % 2 == 0 else [("critic",)])


def test_step_graph_shape_for_several_microbatches():
    method = DMD2Method(tiny_wan_bundle(), wan_adapter(), CONFIG)
    step = first_step_with_exit(method, 1)
    generator, critic = method.step_graph(step, num_microbatches=2)
    assert generator.num_microbatches == 2
    assert generator.steps == ("student.step0", "student.step1", "teacher.cond", "teacher.uncond",
                               "critic.fake", "student.backward")
    assert generator["mb1/student.step0"].kind == FORWARD_NOGRAD
    assert generator["mb1/student.backward"].forward_of == "mb1/student.step1"
    assert critic["mb0/critic.backward"].forward_of == "mb0/critic.denoise"
    assert all(op.kind == FORWARD_NOGRAD for op in critic.ops if op.role == "student")


def test_dmd2_requires_its_roles():
    bundle = tiny_wan_bundle(("student", "teacher"))
    with pytest.raises(RoleError, match="models.critic"):
        DMD2Method(bundle, wan_adapter(), {})
    frozen_critic = tiny_wan_bundle(("student", "teacher", "critic"))
    roles = dict(frozen_critic.roles)
    roles["critic"] = type(roles["critic"])("critic", roles["critic"].module, False)
    with pytest.raises(RoleError, match="critic.*trainable"):
        DMD2Method(ModelBundle(roles), wan_adapter(), {})
