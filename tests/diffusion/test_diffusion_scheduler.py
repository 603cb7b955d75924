import math

import pytest
import torch

from megadistill.diffusion import FlowMatchScheduler, shift_sigma, unshift_sigma


def test_shift_hand_values():
    assert shift_sigma(0.5, 5.0) == pytest.approx(5 / 6)
    assert shift_sigma(0.25, 3.0) == pytest.approx(0.5)
    assert shift_sigma(0.75, 5.0) == pytest.approx(0.9375)
    assert shift_sigma(0.3, 1.0) == pytest.approx(0.3)
    assert shift_sigma(0.0, 7.0) == 0.0 and shift_sigma(1.0, 7.0) == 1.0


def test_unshift_inverts_shift():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 5.0, 12.0):
        torch.testing.assert_close(unshift_sigma(shift_sigma(u, s), s), u, rtol=0, atol=1e-14)
    assert unshift_sigma(5 / 6, 5.0) == pytest.approx(0.5)


def test_training_grid():
    sch = FlowMatchScheduler(1000, shift=5.0)
    assert sch.sigmas.shape == (1000,) and sch.timesteps.dtype == torch.float64
    assert sch.timesteps[0].item() == 1000.0
    assert sch.sigmas[250].item() == pytest.approx(0.9375)     # u = 0.75
    assert sch.sigmas[500].item() == pytest.approx(5 / 6)      # u = 0.5
    assert sch.sigmas[-1].item() == pytest.approx(0.005 / 1.004)  # u = 1/1000, last point before 0
    assert bool((sch.timesteps[1:] < sch.timesteps[:-1]).all())
    plain = FlowMatchScheduler(1000, shift=1.0)
    torch.testing.assert_close(plain.timesteps, torch.arange(1000, 0, -1, dtype=torch.float64))


def test_sigma_timestep_coordinates():
    sch = FlowMatchScheduler(1000, shift=5.0)
    # sigma_from_timestep is the already-shifted noise level t / T, not the grid coordinate.
    assert sch.sigma_from_timestep(torch.tensor(625)).item() == 0.625
    assert sch.unshift_sigma(sch.sigma_from_timestep(torch.tensor(625.0))).item() == pytest.approx(0.25)
    assert sch.timestep_from_sigma(0.9375).item() == 937.5
    with pytest.raises(ValueError, match="shift must be > 0"):
        FlowMatchScheduler(1000, shift=0.0)


def test_snap_to_grid():
    sch = FlowMatchScheduler(1000, shift=1.0)
    assert sch.snap_to_grid(torch.tensor([999.6, 500.2, 0.3])).tolist() == [1000.0, 500.0, 1.0]
    sch5 = FlowMatchScheduler(1000, shift=5.0)
    warped = torch.tensor([[937.5, 625.0]])
    assert sch5.snap_to_grid(warped).tolist() == warped.tolist()  # grid points map to themselves
    # near t = 0 the shift-5 grid is 5x coarser: 4.98 (k=1), 9.92 (k=2)
    assert sch5.snap_to_grid(7.0).item() == pytest.approx(5000 * 0.001 / 1.004)
    assert sch5.snap_to_grid(8.0).item() == pytest.approx(5000 * 0.002 / 1.008)


def test_add_noise_hand_value_and_flow_round_trip():
    sch = FlowMatchScheduler(1000, shift=5.0)
    x0 = torch.ones(2, 1, 1, 1, 1)
    eps = torch.full_like(x0, 3.0)
    x_t = sch.add_noise(x0, eps, torch.tensor([250, 1000]))
    assert x_t.flatten().tolist() == [1.5, 3.0]  # 0.75*1 + 0.25*3 ; pure noise

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([20.0, 512.5, 999.0], dtype=torch.float64)
    x_t = sch.add_noise(x0, eps, t)
    v = sch.flow_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(sch.x0_from_flow(x_t, v, t), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(sch.flow_from_x0(x_t, x0, t), v, rtol=0, atol=1e-10)


def test_per_frame_timesteps_broadcast_over_frame_axis():
    sch = FlowMatchScheduler()
    x0 = torch.zeros(2, 3, 4, 2, 2)
    eps = torch.ones_like(x0)
    t = torch.tensor([[100, 200, 300, 400], [500, 600, 700, 800]])
    x_t = sch.add_noise(x0, eps, t)  # x0 = 0, eps = 1 -> x_t = sigma
    for b in range(2):
        for f in range(4):
            assert bool((x_t[b, :, f] == t[b, f] / 1000).all())
    # [B, F, C, H, W] layout
    x_t2 = sch.add_noise(x0.transpose(1, 2), eps.transpose(1, 2), t, frame_dim=1)
    torch.testing.assert_close(x_t2, x_t.transpose(1, 2))


def test_shape_mismatch_and_zero_sigma_are_rejected():
    sch = FlowMatchScheduler()
    x = torch.zeros(2, 3, 4, 2, 2)
    with pytest.raises(ValueError, match="batch"):
        sch.add_noise(x, x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="frame axis"):
        sch.add_noise(x, x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        sch.flow_from_x0(x, x, torch.tensor([0.0, 10.0]))


def test_low_precision_latents_mix_in_float32():
    sch = FlowMatchScheduler()
    x0 = torch.full((1, 1, 1, 1, 1), 1.0, dtype=torch.bfloat16)
    eps = torch.full_like(x0, -1.0)
    t = torch.tensor([333.0])
    out = sch.add_noise(x0, eps, t)
    assert out.dtype == torch.bfloat16
    expected = torch.tensor(1 - 2 * 0.333, dtype=torch.float32).to(torch.bfloat16)
    assert out.item() == expected.item()
    assert math.isclose(out.float().item(), 0.334, rel_tol=1e-2)
