import math

import pytest
import torch

from megadistill.config import ConfigError
from megadistill.methods import FinetuneMethod, build_method

from methods_helpers import ToyAdapter, tiny_wan_bundle, toy_bundle, wan_adapter, wan_batch


def test_finetune_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    bundle = tiny_wan_bundle(("student",), lr=2e-3)
    adapter = wan_adapter()
    method = build_method("finetune", bundle, adapter, {"cfg_dropout_prob": 0.1})
    raw = wan_batch(with_latents=True)
    batch = adapter.prepare_batch(raw, "data")
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([300.0, 800.0], dtype=torch.float64)
    eps = torch.randn(batch.latents.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return method.loss(batch, t, eps, batch.cond).item()

    start = eval_loss()
    losses = [method.train_step(raw, step)["loss"] for step in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert eval_loss() < 0.7 * start
    assert sum(losses[-5:]) < sum(losses[:5])


def test_finetune_loss_is_flow_matching_at_the_given_timestep():
    adapter = ToyAdapter()
    method = FinetuneMethod(toy_bundle(weights=(0.5, 0.0, 0.0)), adapter, {})
    latents = torch.full((1, 2, 1, 2, 2), 2.0)
    batch = adapter.prepare_batch({"cond": torch.tensor([1.0]), "latents": latents}, "data")
    eps = torch.ones_like(latents)
    loss = method.loss(batch, torch.tensor([250.0], dtype=torch.float64), eps, batch.cond)
    # x_t = 0.75*2 + 0.25*1 = 1.75; v = 0.5*1.75 + 1 = 1.875; target eps - x0 = -1
    assert loss.item() == pytest.approx((1.875 + 1.0) ** 2)


def test_cfg_dropout_replaces_the_text_by_the_negative_text():
    adapter = ToyAdapter(negative=-9.0)
    batch = adapter.prepare_batch({"cond": torch.tensor([1.0, 2.0, 3.0])})
    always = FinetuneMethod(toy_bundle(), adapter, {"cfg_dropout_prob": 1.0})
    never = FinetuneMethod(toy_bundle(), adapter, {"cfg_dropout_prob": 0.0})
    assert always.conditioning(batch).tolist() == [-9.0, -9.0, -9.0]
    assert never.conditioning(batch).tolist() == [1.0, 2.0, 3.0]
    torch.manual_seed(0)
    half = FinetuneMethod(toy_bundle(), adapter, {"cfg_dropout_prob": 0.5})
    big = adapter.prepare_batch({"cond": torch.ones(4000)})
    dropped = (half.conditioning(big) == -9.0).float().mean().item()
    assert 0.45 < dropped < 0.55


def test_finetune_timesteps_lie_on_the_shifted_grid():
    method = FinetuneMethod(toy_bundle(), ToyAdapter(shift=3.0), {})
    t = method.sample_timesteps(5000, "cpu")
    assert t.max().item() <= 1000 and t.min().item() > 0
    assert torch.isin(t, method.timestep_grid).all()
    # shift 3 moves mass to high noise: median sigma = 3*0.5/(1+2*0.5) = 0.75
    assert abs(t.median().item() - 750) < 30


def test_finetune_config_and_graph():
    with pytest.raises(ConfigError) as err:
        FinetuneMethod(toy_bundle(), ToyAdapter(), {"cfg_dropout": 0.1})
    assert err.value.key == "method_config.cfg_dropout"
    with pytest.raises(ConfigError):
        FinetuneMethod(toy_bundle(), ToyAdapter(), {"cfg_dropout_prob": 1.5})
    (graph,) = FinetuneMethod(toy_bundle(), ToyAdapter(), {}).step_graph(0, 3)
    assert graph.num_microbatches == 3 and graph.trainable_roles == ("student",)
