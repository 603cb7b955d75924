"""DMD2 formulas and schedule on hand-computed values, through a toy adapter."""
import pytest
import torch

from megadistill.config import ConfigError
from megadistill.methods import DMD2Method, build_method, dmd_gradient, dmd_loss
from megadistill.methods.dmd2 import CRITIC_PHASE, GENERATOR_PHASE

from methods_helpers import ToyAdapter, toy_bundle


def make(method_config=None, seed=0, adapter=None, **bundle_kw):
    return DMD2Method(toy_bundle(**bundle_kw), adapter or ToyAdapter(), method_config, seed=seed)


def test_dmd_gradient_normalizer_per_sample_and_nan_to_num():
    x = torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])       # [B=2, 1, 2]
    real = torch.tensor([[[0.0, 1.0]], [[2.0, 2.0]]])
    fake = torch.tensor([[[3.0, 0.0]], [[3.0, 2.0]]])
    grad = dmd_gradient(x, real, fake)
    # sample 0: mean|x - real| = (1 + 2) / 2 = 1.5; (fake - real) = [3, -1] -> [2, -2/3]
    assert torch.allclose(grad[0], torch.tensor([[2.0, -2.0 / 3.0]]))
    # sample 1: normalizer 0: 1/0 = inf -> largest float, 0/0 = nan -> 0
    assert grad[1, 0, 0].item() == torch.finfo(torch.float32).max
    assert grad[1, 0, 1].item() == 0.0


def test_dmd_loss_float64_value_and_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    grad = torch.tensor([[2.0, -2.0], [4.0, 0.0]])
    loss = dmd_loss(x, grad)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(0.5 * (4 + 4 + 16 + 0) / 4)  # 0.5 * mean(grad^2) = 3
    loss.backward()
    # d/dx 0.5*mean((x - sg(x - grad))^2) = (x - target)/numel = grad/numel
    assert torch.allclose(x.grad, grad / 4)


@pytest.mark.parametrize("scale,convention,expected", [
    (3.0, "dmd", -2.5),   # cond + 3 (cond - uncond)
    (4.0, "cfg", -2.5),   # uncond + 4 (cond - uncond): the same guidance
    (3.0, "cfg", -2.0),   # uncond + 3 (cond - uncond)
])
def test_teacher_guidance_conventions_through_the_method(scale, convention, expected):
    adapter = ToyAdapter()
    method = make({"guidance_scale": scale, "guidance_convention": convention}, adapter=adapter,
                  weights=(0.5, 0.0, 0.7))
    # teacher v = cond (weight 0): x0 = x_t - sigma * cond; x_t = 0, sigma = 0.5
    x_t, t = torch.zeros(1, 2, 1, 2, 2), torch.tensor([500.0], dtype=torch.float64)
    real = method.real_x0(x_t, t, torch.tensor([2.0]), torch.tensor([1.0]))   # x0: cond -1, uncond -0.5
    assert torch.allclose(real, torch.full_like(x_t, expected))
    assert [c["role"] for c in adapter.calls] == ["teacher", "teacher"]


@pytest.mark.parametrize("config", [{}, {"guidance_scale": 1.0, "guidance_convention": "cfg"},
                                    {"guidance_scale": 0.0, "guidance_convention": "dmd"}])
def test_no_guidance_runs_the_teacher_once(config):
    adapter = ToyAdapter()
    method = make(config, adapter=adapter, weights=(0.5, 0.0, 0.7))
    real = method.real_x0(torch.zeros(1, 2, 1, 2, 2), torch.tensor([500.0], dtype=torch.float64),
                          torch.tensor([2.0]), torch.tensor([1.0]))
    assert torch.allclose(real, torch.full((1, 2, 1, 2, 2), -1.0))
    assert len(adapter.calls) == 1


def test_generator_loss_through_the_method_is_half_mean_square_of_the_normalized_gradient():
    torch.manual_seed(0)
    adapter = ToyAdapter()
    method = make({"guidance_scale": 2.0, "guidance_convention": "cfg"}, adapter=adapter)
    batch = adapter.prepare_batch({"cond": torch.tensor([1.0, -1.0])})
    uncond = adapter.negative_cond(batch)
    loss, logs = method.generator_loss(batch, uncond, exit_index=0)
    student, teacher_c, teacher_u, critic = adapter.calls
    assert [c["role"] for c in adapter.calls] == ["student", "teacher", "teacher", "critic"]
    assert student["grad"] and not teacher_c["grad"] and not critic["grad"]
    x = student["x0"].detach()
    noised = adapter.noised[-1]
    assert torch.equal(noised["x0"], x) and torch.equal(teacher_c["x_t"], noised["x_t"])
    t = noised["t"]
    assert t.dtype == torch.float64 and bool(((t >= 20) & (t <= 980)).all())
    real = teacher_u["x0"] + 2.0 * (teacher_c["x0"] - teacher_u["x0"])
    grad = (critic["x0"] - real) / (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert loss.item() == pytest.approx(0.5 * grad.double().pow(2).mean().item(), rel=1e-6)
    assert logs["dmd_grad_mean_abs"] == pytest.approx(grad.abs().mean().item(), rel=1e-6)


def test_critic_loss_targets_eps_minus_detached_sample():
    torch.manual_seed(1)
    adapter = ToyAdapter()
    method = make(adapter=adapter)
    batch = adapter.prepare_batch({"cond": torch.tensor([0.5, 2.0])})
    loss = method.critic_loss(batch, exit_index=1)
    roles = [c["role"] for c in adapter.calls]
    assert roles == ["student", "student", "critic"]
    assert not any(c["grad"] for c in adapter.calls[:2])          # rollout without grad
    x = adapter.calls[1]["x0"]
    noised = adapter.noised[-1]
    assert torch.equal(noised["x0"], x) and not x.requires_grad
    sigma = (noised["t"] / 1000).reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(noised["x_t"], (1 - sigma.float()) * x + sigma.float() * noised["eps"])
    v = adapter.calls[2]["v"]
    expected = ((v - (noised["eps"] - x)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    bundle = method.bundle
    assert bundle["critic"].module.weight.grad is not None
    assert bundle["student"].module.weight.grad is None


def test_simulate_rollout_renoises_between_steps_and_starts_from_noise():
    torch.manual_seed(2)
    adapter = ToyAdapter()
    method = make({"denoising_steps": [1000, 750, 500, 250]}, adapter=adapter)
    batch = adapter.prepare_batch({"cond": torch.tensor([1.0])})
    method.rollout(batch, exit_index=2, with_grad=True)
    ts = [c["t"].item() for c in adapter.calls]
    assert ts == [1000.0, 750.0, 500.0]
    assert [c["grad"] for c in adapter.calls] == [False, False, True]
    # each later step's input is the previous x0 re-noised to the next timestep
    for j, n in enumerate(adapter.noised):
        assert torch.equal(n["x0"], adapter.calls[j]["x0"]) and torch.equal(n["x_t"], adapter.calls[j + 1]["x_t"])
        assert n["t"].item() == ts[j + 1]


def test_data_latent_rollout_noises_the_data_to_the_exit_step():
    adapter = ToyAdapter()
    method = make({"rollout_mode": "data_latent"}, adapter=adapter)
    latents = torch.randn(2, 2, 1, 2, 2)
    batch = adapter.prepare_batch({"cond": torch.zeros(2), "latents": latents}, "data")
    method.rollout(batch, exit_index=1, with_grad=True)
    assert len(adapter.calls) == 1 and adapter.calls[0]["grad"]
    assert torch.equal(adapter.noised[0]["x0"], latents)
    assert adapter.noised[0]["t"].tolist() == [750.0, 750.0]
    assert method.latents_source == "data"


def test_generator_update_interval_schedule():
    adapter = ToyAdapter()
    method = make({"generator_update_interval": 5}, adapter=adapter)
    generator_steps, critic_steps = [], []
    for step in range(12):
        logs = method.train_step({"cond": torch.tensor([1.0, 0.0])}, step)
        if "generator_loss" in logs:
            generator_steps.append(step)
        if "critic_loss" in logs:
            critic_steps.append(step)
    assert generator_steps == [0, 5, 10]
    assert critic_steps == list(range(12))
    assert [len(make({"generator_update_interval": 1}).step_graph(s, 1)) for s in range(3)] == [2, 2, 2]
    assert [len(method.step_graph(s, 1)) for s in range(6)] == [2, 1, 1, 1, 1, 2]


def test_train_step_moves_student_only_on_generator_steps():
    method = make({"generator_update_interval": 2})
    student, teacher, critic = (method.bundle[r].module.weight for r in ("student", "teacher", "critic"))
    before = [p.item() for p in (student, teacher, critic)]
    logs = method.train_step({"cond": torch.tensor([1.0, -2.0])}, 1)
    assert student.item() == before[0] and critic.item() != before[2]
    method.train_step({"cond": torch.tensor([1.0, -2.0])}, 2)
    assert student.item() != before[0] and teacher.item() == before[1]
    assert set(logs) == {"critic_loss", "critic_grad_norm"}


def test_exit_index_is_a_function_of_seed_and_step():
    a, b, c = make(seed=7), make(seed=7), make(seed=8)
    draws_a = [a.exit_index(s) for s in range(64)]
    assert draws_a == [b.exit_index(s) for s in range(64)]
    assert draws_a != [c.exit_index(s) for s in range(64)]
    assert set(draws_a) == {0, 1, 2, 3}
    assert draws_a != [a.exit_index(s, CRITIC_PHASE) for s in range(64)]
    assert a.exit_index(5, GENERATOR_PHASE) == a.exit_index(5)


def test_warped_step_list_and_timestep_range():
    method = make({"warp_denoising_step": True}, adapter=ToyAdapter(shift=5.0))
    assert torch.allclose(method.denoising_steps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float64))
    t = method.sample_timesteps(4096, "cpu")
    assert t.min().item() >= 20 and t.max().item() == 980  # shift 5 pushes every k >= 907 to the clamp
    unwarped = make({"denoising_steps": [999, 500]}, adapter=ToyAdapter(shift=5.0))
    assert unwarped.denoising_steps.tolist() == [999.0, 500.0]
    plain = make({"timestep_shift": 1.0}, adapter=ToyAdapter(shift=5.0))
    t = plain.sample_timesteps(4096, "cpu")
    assert abs(t.mean().item() - 500) < 20 and t.max().item() == 980 and t.min().item() == 20


def test_generator_step_updates_the_student_ema():
    from megadistill.methods import EMA

    method = make({"generator_update_interval": 1})
    student = method.bundle["student"]
    student.ema = EMA(student.module, decay=0.5, start_step=0)
    before = student.module.weight.item()
    method.train_step({"cond": torch.tensor([1.0, -2.0])}, 0)
    after = student.module.weight.item()
    assert after != before
    assert student.ema.shadow["weight"].item() == pytest.approx(0.5 * before + 0.5 * after)


@pytest.mark.parametrize("config,key", [
    ({"guidance_scal": 3.0}, "method_config.guidance_scal"),
    ({"guidance_scale": 3.0}, "method_config.guidance_convention"),
    ({"guidance_scale": 3.0, "guidance_convention": "standard"}, "method_config.guidance_convention"),
    ({"guidance_convention": "cfg"}, "method_config.guidance_convention"),
    ({"rollout_mode": "simulated"}, "method_config.rollout_mode"),
    ({"generator_update_interval": 0}, "method_config.generator_update_interval"),
    ({"generator_update_interval": 2.5}, "method_config.generator_update_interval"),
    ({"denoising_steps": []}, "method_config.denoising_steps"),
    ({"denoising_steps": [250, 500]}, "method_config.denoising_steps"),
    ({"min_timestep": 990}, "method_config.min_timestep"),
    ({"flow_shift": 5.0}, "method_config.flow_shift"),
    ({"warp_denoising_step": "yes"}, "method_config.warp_denoising_step"),
])
def test_bad_method_config_names_the_key(config, key):
    with pytest.raises(ConfigError) as err:
        make(config)
    assert err.value.key == key


def test_registry_builds_and_rejects_unknown_names():
    method = build_method("dmd2", toy_bundle(), ToyAdapter(), {"generator_update_interval": 3}, seed=4)
    assert isinstance(method, DMD2Method) and method.seed == 4 and method.config.generator_update_interval == 3
    with pytest.raises(ConfigError, match="unknown method 'dmd3'"):
        build_method("dmd3", toy_bundle(), ToyAdapter(), {})
