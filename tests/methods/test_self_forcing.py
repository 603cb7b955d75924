"""Self-forcing DMD on tiny Wan models: rank-agreeing plans, the block rollout against a manual
loop over the causal DiT, gradient only through exit-step forwards, cache refresh, long rollouts,
config checks and the op graphs."""
import pytest
import torch

from megadistill.config import ConfigError
from megadistill.diffusion import FlowMatchScheduler
from megadistill.methods import ModelBundle, RoleHandle, RolloutPlan, SelfForcingMethod, build_method
from megadistill.methods.dmd2 import dmd_gradient, dmd_loss
from megadistill.models.wan import WanDiT, get_preset, init_weights
from megadistill.models.wan.adapter import WanAdapter
from megadistill.models.wan.causal import CausalWanDiT

SHAPE = (16, 4, 4, 4)   # (C, F, H, W): 2 blocks of 2 frames
N = 2                   # frames per block
STEPS = (1000.0, 750.0, 500.0, 250.0)


class RecordingAdapter(WanAdapter):
    """WanAdapter that records every cached-path call and every add_noise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_calls, self.noised = [], []

    def predict_flow_block(self, handle, x_block, t_block, cond, cache, start_frame):
        v = super().predict_flow_block(handle, x_block, t_block, cond, cache, start_frame)
        self.block_calls.append(dict(x=x_block.detach().clone(), t=t_block.clone(), start=start_frame,
                                     grad=torch.is_grad_enabled(), v=v))
        return v

    def add_noise(self, x0, eps, t):
        out = super().add_noise(x0, eps, t)
        self.noised.append(dict(x0=x0.detach().clone(), eps=eps.clone(), t=t.clone(), out=out.detach().clone()))
        return out


def make_bundle(causal_student=True, window=None):
    cfg = get_preset("tiny")
    student = CausalWanDiT(cfg, num_frame_per_block=N, local_window_frames=window) if causal_student \
        else WanDiT(cfg)
    student = init_weights(student, seed=1)
    teacher, critic = init_weights(WanDiT(cfg), seed=2), init_weights(WanDiT(cfg), seed=3)
    return ModelBundle({
        "student": RoleHandle("student", student, True, optimizer=torch.optim.SGD(student.parameters(), lr=1e-2)),
        "teacher": RoleHandle("teacher", teacher, False),
        "critic": RoleHandle("critic", critic, True, optimizer=torch.optim.SGD(critic.parameters(), lr=1e-2))})


def make_method(config=None, seed=0, bundle=None, shape=SHAPE):
    adapter = RecordingAdapter(None, FlowMatchScheduler(1000, 5.0), latent_shape=shape,
                               negative_text_states=torch.randn(6, 64, generator=torch.Generator().manual_seed(9)))
    cfg = {"denoising_steps": [1000, 750, 500, 250], "generator_update_interval": 1,
           "guidance_scale": 3.0, "guidance_convention": "dmd", **(config or {})}
    return build_method("self_forcing", bundle or make_bundle(), adapter, cfg, seed=seed)


def prepared(method, batch=2):
    raw = {"text_states": torch.randn(batch, 8, 64, generator=torch.Generator().manual_seed(5))}
    return method.adapter.prepare_batch(raw, "zeros")


# -- plans ------------------------------------------------------------------------------------------

def test_plan_is_a_function_of_seed_and_step_shared_by_blocks():
    bundle = make_bundle()  # plans do not depend on weights: one bundle for every instance
    a, b = make_method(seed=7, bundle=bundle), make_method(seed=7, bundle=bundle)
    plans = [a.rollout_plan(s, p) for s in range(40) for p in ("generator", "critic")]
    assert plans == [b.rollout_plan(s, p) for s in range(40) for p in ("generator", "critic")]  # every rank agrees
    assert all(len(set(p.exits)) == 1 and p.num_blocks == 2 and p.grad_from_block == 0 for p in plans)
    assert {p.exits[0] for p in plans} == {0, 1, 2, 3}  # uniform over the step list
    other = make_method(seed=8, bundle=bundle)
    assert [other.rollout_plan(s).exits for s in range(40)] != [a.rollout_plan(s).exits for s in range(40)]
    assert a.exit_index(3, "critic") == a.rollout_plan(3, "critic").exits[0]


def test_exit_step_per_block_varies_across_blocks():
    bundle = make_bundle()
    m = make_method({"exit_step_per_block": True}, bundle=bundle)
    plans = [m.rollout_plan(s) for s in range(30)]
    assert any(len(set(p.exits)) > 1 for p in plans)
    again = make_method({"exit_step_per_block": True}, bundle=bundle)
    assert plans == [again.rollout_plan(s) for s in range(30)]


def test_random_rollout_length_draws_whole_blocks_in_range():
    m = make_method({"num_rollout_frames": 8, "random_rollout_length": True})
    plans = [m.rollout_plan(s) for s in range(30)]
    assert {p.num_blocks for p in plans} == {2, 3, 4}
    assert all(p.grad_from_block == p.num_blocks - 2 for p in plans)  # the last F = 4 frames are graded


# -- the rollout ------------------------------------------------------------------------------------

def manual_rollout(method, batch, plan, context_t=0.0):
    """A plain block loop over the causal DiT (no adapter, no helper), drawing noise in the same
    order as the method: the clip's noise, then per block the re-noising and the refresh noise."""
    model, sched, text = method.bundle["student"].module, method.adapter.noise_scheduler, batch.cond["text_states"]
    steps = torch.tensor(STEPS, dtype=torch.float64)
    B, C, _, H, W = batch.latents.shape
    noise = torch.randn(B, C, plan.num_blocks * N, H, W)
    cache = model.new_cache(B, plan.num_blocks * N)
    out = []
    for b in range(plan.num_blocks):
        s, e = b * N, plan.exits[b]
        x = noise[:, :, s:s + N]
        for j in range(e + 1):
            t = steps[j].expand(B).clone()
            x0 = sched.x0_from_flow(x, model.forward_block(x, t, text, cache, s).float(), t)
            if j < e:
                x = sched.add_noise(x0, torch.randn_like(x0), steps[j + 1].expand(B))
        out.append(x0)
        if b + 1 < plan.num_blocks:
            tc = torch.full((B,), float(context_t), dtype=torch.float64)
            xc = x0 if context_t == 0 else sched.add_noise(x0, torch.randn_like(x0), tc)
            model.forward_block(xc, tc, text, cache, s)
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("config", [{}, {"exit_step_per_block": True, "context_noise": 100}])
@torch.no_grad()
def test_rollout_equals_manual_block_loop(config):
    m = make_method(config)
    batch = prepared(m)
    for step in (0, 1, 2):
        plan = m.rollout_plan(step)
        torch.manual_seed(11)
        got = m.rollout(batch, plan, with_grad=False)
        torch.manual_seed(11)
        want = manual_rollout(m, batch, plan, context_t=m.context_timestep)
        assert got.shape == (2,) + SHAPE
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("context_noise", [0, 250])
@torch.no_grad()
def test_cache_is_refreshed_with_the_clean_output(context_noise):
    m = make_method({"context_noise": context_noise, "exit_step_per_block": True})
    plan = RolloutPlan(2, (2, 1), 0)
    video = m.rollout(prepared(m), plan, with_grad=False)
    calls = m.adapter.block_calls
    assert [c["start"] for c in calls] == [0, 0, 0, 0, 2, 2]  # 3 steps + refresh, 2 steps, no refresh
    refresh = calls[3]
    assert torch.all(refresh["t"] == float(context_noise))
    x0_block0 = video[:, :, :N]
    if context_noise == 0:
        torch.testing.assert_close(refresh["x"], x0_block0, rtol=0, atol=0)
    else:
        renoise = m.adapter.noised[2]   # block 0 re-noised twice (steps 0, 1), then for the refresh
        torch.testing.assert_close(renoise["x0"], x0_block0, rtol=0, atol=0)
        assert torch.all(renoise["t"] == float(context_noise))
        torch.testing.assert_close(refresh["x"], (1 - 0.25) * x0_block0 + 0.25 * renoise["eps"])
    # Block 1 sees block 0's refreshed keys: re-running its exit step on a cache written by the
    # refresh alone reproduces it.
    model = m.bundle["student"].module
    cache = model.new_cache(2, 4)
    cond = prepared(m).cond["text_states"]
    model.forward_block(refresh["x"], refresh["t"], cond, cache, 0)
    v = model.forward_block(calls[5]["x"], calls[5]["t"], cond, cache, 2)
    torch.testing.assert_close(v, calls[5]["v"], rtol=1e-5, atol=1e-6)


def test_gradient_flows_only_through_exit_step_forwards():
    m = make_method({"exit_step_per_block": True})
    plan = RolloutPlan(2, (2, 0), 0)
    batch = prepared(m)
    torch.manual_seed(3)
    video = m.rollout(batch, plan, with_grad=True)
    calls = m.adapter.block_calls
    graded = [i for i, c in enumerate(calls) if c["grad"]]
    assert graded == [2, 4]  # block 0 exits at step 2 (calls 0-2, refresh 3), block 1 at step 0
    assert all(calls[i]["v"].requires_grad == (i in graded) for i in range(len(calls)))
    fired = []
    for i in graded:
        calls[i]["v"].register_hook(lambda g, i=i: fired.append(i))
    student = m.bundle["student"].module
    weights = torch.randn_like(video)
    (video * weights).sum().backward()
    assert sorted(fired) == graded
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    # The same gradient from a manual rollout in which only the two exit forwards carry grad.
    student.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with torch.no_grad():
        ref = manual_rollout(m, batch, plan)
    torch.testing.assert_close(video.detach(), ref, rtol=0, atol=0)
    sched, text = m.adapter.noise_scheduler, batch.cond["text_states"]
    cache = student.new_cache(2, 4)
    x_in = [calls[2]["x"], calls[4]["x"]]
    t_in = [calls[2]["t"], calls[4]["t"]]
    with torch.no_grad():
        student.forward_block(calls[0]["x"], calls[0]["t"], text, cache, 0)  # block 0's steps 0..1 and
        student.forward_block(calls[1]["x"], calls[1]["t"], text, cache, 0)  # exit re-create its writes
    x0_0 = sched.x0_from_flow(x_in[0], student.forward_block(x_in[0], t_in[0], text, cache, 0).float(), t_in[0])
    with torch.no_grad():
        student.forward_block(x0_0.detach(), torch.zeros(2, dtype=torch.float64), text, cache, 0)
    x0_1 = sched.x0_from_flow(x_in[1], student.forward_block(x_in[1], t_in[1], text, cache, 2).float(), t_in[1])
    (torch.cat([x0_0, x0_1], dim=2) * weights).sum().backward()
    want = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 0
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


def test_long_rollout_returns_the_last_window_and_grades_only_it():
    m = make_method({"num_rollout_frames": 8})
    plan = m.rollout_plan(0)
    assert (plan.num_blocks, plan.grad_from_block) == (4, 2)
    torch.manual_seed(0)
    video = m.rollout(prepared(m), plan, with_grad=True)
    assert video.shape == (2,) + SHAPE
    calls = m.adapter.block_calls
    graded_starts = [c["start"] for c in calls if c["grad"]]
    assert graded_starts == [4, 6]  # the exit forwards of the last two blocks only
    torch.manual_seed(0)
    with torch.no_grad():
        full = manual_rollout(m, prepared(m), plan)
    torch.testing.assert_close(video.detach(), full[:, :, 4:], rtol=0, atol=0)


def test_local_window_student_rolls_out_past_its_cache():
    m = make_method({"num_rollout_frames": 12}, bundle=make_bundle(window=4))
    with torch.no_grad():
        video = m.rollout(prepared(m), m.rollout_plan(0), with_grad=False)
    assert video.shape == (2,) + SHAPE and torch.isfinite(video).all()


# -- the step ---------------------------------------------------------------------------------------

def test_generator_loss_is_dmd_of_the_rollout():
    m = make_method()
    batch = prepared(m)
    uncond = m.adapter.negative_cond(batch)
    plan = m.rollout_plan(0)
    torch.manual_seed(4)
    loss, logs = m.generator_loss(batch, uncond, plan)
    torch.manual_seed(4)
    with torch.no_grad():
        x = m.rollout(batch, plan, with_grad=False)
        t = m.sample_timesteps(2, x.device)
        x_t = m.adapter.add_noise(x, torch.randn_like(x), t)
        real = m.real_x0(x_t, t, batch.cond, uncond)
        fake = m.adapter.predict_x0(m.bundle["critic"], x_t, t, batch.cond)
    torch.testing.assert_close(loss, dmd_loss(x, dmd_gradient(x, real, fake)), rtol=1e-12, atol=0)
    assert logs["dmd_timestep_mean"] == pytest.approx(t.mean().item())


def test_train_step_updates_roles_on_the_two_time_scale_rule():
    m = make_method({"generator_update_interval": 2})
    raw = {"text_states": torch.randn(2, 8, 64)}
    student, critic = m.bundle["student"].module, m.bundle["critic"].module
    s0, c0 = [p.clone() for p in student.parameters()], [p.clone() for p in critic.parameters()]
    logs = m.train_step(raw, 1)  # critic only
    assert "generator_loss" not in logs and logs["critic_loss"] > 0
    assert all(torch.equal(a, b) for a, b in zip(s0, student.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(c0, critic.parameters()))
    logs = m.train_step(raw, 2)
    assert logs["generator_loss"] > 0 and logs["rollout_frames"] == 4.0
    assert not all(torch.equal(a, b) for a, b in zip(s0, student.parameters()))


def test_sampling_spec_is_causal():
    spec = make_method({"context_noise": 100, "warp_denoising_step": True}).sampling_spec()
    assert spec.causal and spec.sampler == "sde" and spec.context_timestep == 100.0
    assert spec.timesteps == pytest.approx((1000.0, 937.5, 833.3333, 625.0), abs=1e-3)


# -- graphs -----------------------------------------------------------------------------------------

def test_step_graph_uses_the_pipeline_builders_and_covers_per_block_plans():
    from megadistill.pipeline.graph import FORWARD, self_forcing_generator_graph

    m = make_method({"generator_update_interval": 1})
    plan = m.rollout_plan(0)
    gen, critic = m.step_graph(0, 2)
    assert gen == self_forcing_generator_graph(2, num_blocks=2, num_denoise_steps=4, exit_step=plan.exits[0],
                                               block_tokens=2 * 4, cfg=True)
    assert critic.trainable_roles == ("critic",)
    m = make_method({"exit_step_per_block": True, "num_rollout_frames": 8})
    for step in range(6):
        plan = m.rollout_plan(step)
        gen = m.step_graph(step, 1)[0]
        graded = [op.step for op in gen.ops if op.kind == FORWARD]
        assert graded == [f"student.block{k}.step{plan.exits[k]}" for k in range(plan.grad_from_block, 4)]
        assert gen["mb0/teacher.cond"].tokens == 4 * 4  # the DMD window: 4 frames x 4 tokens per frame


# -- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, key", [
    ({"exit_step_per_frame": True}, "exit_step_per_frame"),
    ({"guidance_scale": 3.0, "guidance_convention": None}, "guidance_convention"),
    ({"rollout_mode": "data_latent"}, "rollout_mode"),
    ({"context_noise": 2000}, "context_noise"),
    ({"num_rollout_frames": 5}, "num_rollout_frames"),
    ({"num_rollout_frames": 2}, "num_rollout_frames"),
    ({"random_rollout_length": True}, "random_rollout_length"),
    ({"exit_step_per_block": "yes"}, "exit_step_per_block"),
])
def test_config_errors_name_the_key_and_the_method(config, key):
    with pytest.raises(ConfigError) as e:
        make_method(config)
    assert e.value.key == f"method_config.{key}" and "self_forcing" in str(e.value)


def test_bidirectional_student_is_refused():
    with pytest.raises(ValueError, match="block-causal"):
        make_method(bundle=make_bundle(causal_student=False))
    assert isinstance(make_method(), SelfForcingMethod)
