import pytest
import torch

from megadistill.diffusion import (FlowMatchScheduler, cfg_scale_from_dmd, denoising_step_list,
                                   dmd_scale_from_cfg, guided_prediction, sample_dmd_timesteps,
                                   sample_timesteps_uniform)


def test_warp_denoising_steps_shift5():
    warped = denoising_step_list([1000, 750, 500, 250], warp=True, shift=5.0)
    assert warped.tolist() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-9)
    # the rule is a lookup table[T - k] in [scheduler.timesteps..., 0]
    table = torch.cat([FlowMatchScheduler(1000, 5.0).timesteps, torch.zeros(1, dtype=torch.float64)])
    assert warped.tolist() == [table[0].item(), table[250].item(), table[500].item(), table[750].item()]
    assert denoising_step_list([500, 0], warp=True, shift=5.0).tolist() == pytest.approx([2500 / 3, 0.0])


def test_unwarped_and_shift1_lists_are_unchanged():
    assert denoising_step_list([1000, 750, 500, 250]).tolist() == [1000, 750, 500, 250]
    assert denoising_step_list([1000, 750, 500, 250], warp=True, shift=1.0).tolist() == [1000, 750, 500, 250]


def test_bad_step_lists_are_rejected():
    with pytest.raises(ValueError, match="integers"):
        denoising_step_list([1000, 750.5], warp=True, shift=5.0)
    with pytest.raises(ValueError, match="integers"):
        denoising_step_list([1001], warp=True, shift=5.0)
    with pytest.raises(ValueError, match="decreasing"):
        denoising_step_list([250, 500])
    with pytest.raises(ValueError, match="non-empty"):
        denoising_step_list([])


def test_uniform_sampling_list():
    assert sample_timesteps_uniform(4, 1.0).tolist() == [1000, 750, 500, 250]
    torch.testing.assert_close(sample_timesteps_uniform(4, 5.0),
                               denoising_step_list([1000, 750, 500, 250], warp=True, shift=5.0))
    torch.testing.assert_close(sample_timesteps_uniform(1000, 3.0), FlowMatchScheduler(1000, 3.0).timesteps)
    ts = sample_timesteps_uniform(50, 5.0)
    assert ts.shape == (50,) and ts[0].item() == 1000.0
    assert ts[-1].item() == pytest.approx(1000 * 5 * 0.02 / (1 + 4 * 0.02))
    with pytest.raises(ValueError):
        sample_timesteps_uniform(0, 5.0)


@pytest.mark.parametrize("k, expected", [
    (500, 2500 / 3),   # shift(0.5) = 5/6
    (10, 1000 * 0.05 / 1.04),  # shifted first (48.08); clamp-then-shift would give 92.6
    (999, 980.0),      # shift(0.999) = 999.8 -> clamped to 980
    (0, 20.0),         # 0 -> clamped up to 20
])
def test_dmd_timestep_shift_then_clamp(k, expected):
    g = torch.Generator().manual_seed(0)
    t = sample_dmd_timesteps(3, g, shift=5.0, low=k, high=k + 1)
    assert t.dtype == torch.float64 and t.shape == (3,)
    assert t.tolist() == pytest.approx([expected] * 3)


def test_dmd_timestep_distribution_and_determinism():
    t = sample_dmd_timesteps(4000, torch.Generator().manual_seed(1), shift=1.0)
    assert bool((t == t.round()).all()) and t.min().item() == 20 and t.max().item() == 980
    assert abs(t.mean().item() - 500) < 15
    # shift 5 pushes mass to high noise: P(t > 833.3) = P(k > 500) ~ 1/2
    t5 = sample_dmd_timesteps(4000, torch.Generator().manual_seed(1), shift=5.0)
    assert abs((t5 > 2500 / 3).double().mean().item() - 0.5) < 0.03
    again = sample_dmd_timesteps(4000, torch.Generator().manual_seed(1), shift=5.0)
    assert torch.equal(t5, again)
    with pytest.raises(ValueError):
        sample_dmd_timesteps(2, None, min_t=900, max_t=100)


def test_guidance_conventions():
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert guided_prediction(cond, uncond, 4.0, "cfg").tolist() == [5.0, -7.0]
    assert guided_prediction(cond, uncond, 3.0, "dmd").tolist() == [5.0, -7.0]
    assert guided_prediction(cond, uncond, 1.0, "cfg").tolist() == cond.tolist()
    assert guided_prediction(cond, uncond, 0.0, "dmd").tolist() == cond.tolist()
    assert cfg_scale_from_dmd(3.0) == 4.0 and dmd_scale_from_cfg(4.0) == 3.0
    with pytest.raises(ValueError, match="convention"):
        guided_prediction(cond, uncond, 3.0, "CFG")
