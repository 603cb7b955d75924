import pytest
import torch

from megadistill.diffusion import (FlowMatchScheduler, denoising_step_list, ode_sample,
                                   sample_timesteps_uniform, sde_sample)


def _data(seed=0, shape=(2, 4, 3, 2, 2), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def test_euler_with_exact_constant_flow_lands_on_x0():
    x0, eps = _data()
    sch = FlowMatchScheduler(shift=5.0)
    out = ode_sample(lambda x, t: eps - x0, eps, sample_timesteps_uniform(7, 5.0), sch)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


def test_euler_uses_the_sigma_of_the_timestep_it_passes():
    # v = (x - x0) / sigma(t) is the exact flow toward a fixed x0 read from the state; Euler then
    # scales (x - x0) by sigma_next / sigma each step and ends exactly at x0 only if the t handed
    # to the model and the sigma of the update agree at every step.
    x0, eps = _data(1)
    sch = FlowMatchScheduler(shift=3.0)
    seen = []

    def predict(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == torch.float64
        seen.append(t[0].item())
        return (x - x0) / (t / 1000).view(-1, 1, 1, 1, 1)

    ts = denoising_step_list([1000, 750, 500, 250], warp=True, shift=3.0)
    out = ode_sample(predict, eps, ts, sch)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    assert seen == ts.tolist()


def test_euler_on_gaussian_toy_converges_to_exact_transport():
    # data x0 ~ N(mu, s^2) in 1-D; the exact flow is affine in x and the ODE maps noise eps to
    # mu + s * eps. Euler's error is O(1/n).
    mu, s = 0.7, 0.4

    def predict(x, t):
        sig = (t / 1000).view(-1, 1)
        var = (1 - sig) ** 2 * s * s + sig ** 2
        return -mu + (sig - (1 - sig) * s * s) / var * (x - (1 - sig) * mu)

    eps = torch.linspace(-2, 2, 9, dtype=torch.float64).view(-1, 1)
    sch = FlowMatchScheduler()
    exact = mu + s * eps
    err = [(ode_sample(predict, eps, sample_timesteps_uniform(n), sch) - exact).abs().max().item()
           for n in (50, 400)]
    assert err[1] < 4e-3
    assert 7.5 < err[0] / err[1] < 8.5  # first order: 8x the steps, 1/8 the error


def test_ode_sample_keeps_dtype_and_checks_timesteps():
    x0, eps = _data(dtype=torch.bfloat16)
    sch = FlowMatchScheduler()
    out = ode_sample(lambda x, t: (eps - x0).to(x.dtype), eps, [1000.0, 500.0], sch)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x0.float(), atol=2e-2, rtol=0)
    for bad in ([500.0, 1000.0], [1000.0, 0.0], [1200.0], []):
        with pytest.raises(ValueError):
            ode_sample(lambda x, t: x, eps, bad, sch)


def test_sde_sample_renoises_with_fresh_noise_from_the_generator():
    x0, eps = _data(2)
    sch = FlowMatchScheduler(shift=5.0)
    ts = denoising_step_list([1000, 750, 500, 250], warp=True, shift=5.0)
    inputs = []

    def predict(x, t):
        inputs.append(x.clone())
        return (x - x0) / (t / 1000).view(-1, 1, 1, 1, 1)  # exact flow toward x0

    out = sde_sample(predict, eps, ts, sch, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    assert len(inputs) == 4 and torch.equal(inputs[0], eps)
    ref = torch.Generator().manual_seed(7)
    for i in range(1, 4):
        fresh = torch.randn(eps.shape, generator=ref, dtype=torch.float64)
        sigma = ts[i].item() / 1000
        torch.testing.assert_close(inputs[i], (1 - sigma) * x0 + sigma * fresh, rtol=0, atol=1e-12)


def test_sde_sample_is_deterministic_given_the_generator():
    x0, eps = _data(3)
    sch = FlowMatchScheduler(shift=5.0)
    ts = sample_timesteps_uniform(3, 5.0)
    blur = lambda x, t: 0.5 * x  # noqa: E731  (not the exact flow: the result depends on the noise)
    a = sde_sample(blur, eps, ts, sch, torch.Generator().manual_seed(11))
    b = sde_sample(blur, eps, ts, sch, torch.Generator().manual_seed(11))
    c = sde_sample(blur, eps, ts, sch, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
