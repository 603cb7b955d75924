"""ODE-init on tiny Wan models: per-block state draws, the regression loss through the masked path,
loss decrease on a fixed batch, data checks."""
import pytest
import torch

from megadistill.config import ConfigError
from megadistill.diffusion import FlowMatchScheduler, denoising_step_list, sample_timesteps_uniform
from megadistill.methods import ModelBundle, OdeInitMethod, RoleError, RoleHandle, build_method
from megadistill.methods.ode_init import ode_trajectory, trajectory_timesteps
from megadistill.models.wan import WanDiT, get_preset, init_weights
from megadistill.models.wan.adapter import WanAdapter
from megadistill.models.wan.causal import CausalWanDiT

SHAPE = (16, 4, 4, 4)
N = 2


def make_method(config=None, lr=2e-3, with_teacher=False, causal=True):
    student = init_weights(CausalWanDiT(get_preset("tiny"), num_frame_per_block=N) if causal
                           else WanDiT(get_preset("tiny")), seed=1)
    roles = {"student": RoleHandle("student", student, True,
                                   optimizer=torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.999)))}
    if with_teacher:
        roles["teacher"] = RoleHandle("teacher", init_weights(WanDiT(get_preset("tiny")), seed=2), False)
    adapter = WanAdapter(None, FlowMatchScheduler(1000, 5.0), latent_shape=SHAPE)
    cfg = {"denoising_steps": [1000, 750, 500, 250], "warp_denoising_step": True, **(config or {})}
    return build_method("ode_init", ModelBundle(roles), adapter, cfg)


def ode_batch(batch=2, seed=0):
    """Trajectories of a tiny random teacher at the warped steps."""
    g = torch.Generator().manual_seed(seed)
    teacher = init_weights(WanDiT(get_preset("tiny")), seed=2).eval()
    text = torch.randn(batch, 8, 64, generator=g)
    sched = FlowMatchScheduler(1000, 5.0)
    keep = denoising_step_list([1000, 750, 500, 250], warp=True, shift=5.0)
    grid = trajectory_timesteps(sample_timesteps_uniform(4, shift=5.0), keep)
    noise = torch.randn(batch, *SHAPE, generator=g)
    states, endpoint = ode_trajectory(lambda x, t: teacher(x, t, text), noise, grid, keep, sched)
    return {"text_states": text, "latents": endpoint, "ode_states": states,
            "ode_timesteps": keep.expand(batch, -1).clone()}


def test_block_draws_share_one_state_per_block():
    m = make_method()
    idx = m.draw_indices(64, 4, 4, "cpu")
    assert idx.shape == (64, 4)
    assert torch.equal(idx[:, 0], idx[:, 1]) and torch.equal(idx[:, 2], idx[:, 3])
    assert not torch.equal(idx[:, 0], idx[:, 2]) and set(idx.unique().tolist()) == {0, 1, 2, 3}
    clip = make_method({"timestep_granularity": "clip"}).draw_indices(16, 4, 4, "cpu")
    assert all(len(set(row.tolist())) == 1 for row in clip)


def test_loss_regresses_the_masked_prediction_onto_the_endpoint():
    m = make_method()
    raw = ode_batch()
    batch = m.adapter.prepare_batch(raw, "data")
    states, ts = m.trajectory(raw, batch)
    index = torch.tensor([[0, 0, 3, 3], [2, 2, 1, 1]])
    loss = m.loss(states, ts, batch.latents, batch.cond, index)
    x_t = torch.stack([torch.cat([states[b, index[b, f], :, f:f + 1] for f in range(4)], dim=1) for b in range(2)])
    t = torch.stack([ts[b, index[b]] for b in range(2)])  # [B, F] per-frame timesteps
    student = m.bundle["student"].module
    v = student(x_t, t, raw["text_states"])
    sigma = (t / 1000.0)[:, None, :, None, None]
    want = ((x_t - sigma * v) - raw["latents"]).pow(2).mean()
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-7)


def test_loss_decreases_on_a_fixed_batch():
    m = make_method()
    raw = ode_batch()
    torch.manual_seed(0)
    losses = [m.train_step(raw, step)["loss"] for step in range(30)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_trajectory_checks():
    m = make_method()
    raw = ode_batch()
    batch = m.adapter.prepare_batch(raw, "data")
    with pytest.raises(ValueError, match="generate_ode_pairs"):
        m.trajectory({"text_states": raw["text_states"]}, batch)
    wrong = dict(raw, ode_timesteps=torch.tensor([[1000.0, 750, 500, 250]] * 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="differ from the student's step list"):
        m.trajectory(wrong, batch)


def test_trajectory_passes_through_the_kept_timesteps_only_as_grid_points():
    keep = torch.tensor([1000.0, 625.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="not a point of the sampling grid"):
        ode_trajectory(lambda x, t: x, torch.zeros(1, 2), torch.tensor([1000.0, 500.0]), keep,
                       FlowMatchScheduler(1000, 1.0))
    grid = trajectory_timesteps(torch.tensor([1000.0, 500.0], dtype=torch.float64), keep)
    assert grid.tolist() == [1000.0, 625.0, 500.0]


def test_config_and_roles():
    with pytest.raises(ConfigError, match="timestep_granularity"):
        make_method({"timestep_granularity": "pixel"})
    with pytest.raises(ConfigError, match="unknown key"):
        make_method({"guidance_scale": 3.0})
    with pytest.raises(RoleError, match="precomputed trajectories"):
        make_method(with_teacher=True)
    spec = make_method().sampling_spec()
    assert spec.causal and spec.sampler == "sde" and spec.timesteps[1] == pytest.approx(937.5)
    assert isinstance(make_method(), OdeInitMethod)
    (graph,) = make_method().step_graph(0, 2)
    assert graph.trainable_roles == ("student",) and len(graph) == 4


def test_bidirectional_student_regresses_with_one_state_per_clip():
    """A bidirectional student (the warm start of a DMD2 student) takes clip draws only; its loss
    is the whole-clip regression at the one drawn state, and it samples bidirectionally."""
    with pytest.raises(ConfigError, match="needs a block-causal student"):
        make_method(causal=False)
    with pytest.raises(ConfigError, match="needs a block-causal student"):
        make_method({"timestep_granularity": "frame"}, causal=False)
    m = make_method({"timestep_granularity": "clip"}, causal=False)
    assert not m.sampling_spec().causal and m.sampling_spec().sampler == "sde"
    raw = ode_batch()
    batch = m.adapter.prepare_batch(raw, "data")
    states, ts = m.trajectory(raw, batch)
    index = torch.tensor([[1] * 4, [3] * 4])
    loss = m.loss(states, ts, batch.latents, batch.cond, index)
    x_t, t = states[torch.arange(2), index[:, 0]], ts[torch.arange(2), index[:, 0]]
    v = m.bundle["student"].module(x_t, t, raw["text_states"])  # [B] timesteps: the plain bidirectional call
    want = ((x_t - (t / 1000.0)[:, None, None, None, None] * v) - raw["latents"]).pow(2).mean()
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-7)
    torch.manual_seed(0)
    losses = [m.train_step(raw, step)["loss"] for step in range(30)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
