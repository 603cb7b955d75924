import pytest
import torch

from megadistill.diffusion import FlowMatchScheduler
from megadistill.methods import Adapter, RoleHandle
from megadistill.models.wan.adapter import WanAdapter

from methods_helpers import LATENT_SHAPE, tiny_wan, wan_adapter, wan_batch


def test_wan_adapter_satisfies_the_protocol():
    assert isinstance(wan_adapter(), Adapter)


def test_predictions_follow_the_flow_convention():
    torch.manual_seed(0)
    net = tiny_wan(0)
    handle = RoleHandle("any", net, False)
    adapter = wan_adapter()
    raw = wan_batch()
    batch = adapter.prepare_batch(raw)
    x_t = torch.randn(2, *LATENT_SHAPE)
    t = torch.tensor([900.0, 250.0], dtype=torch.float64)
    v = adapter.predict_flow(handle, x_t, t, batch.cond)
    assert torch.equal(v, net(x_t, t, raw["text_states"]))
    x0 = adapter.predict_x0(handle, x_t, t, batch.cond)
    sigma = torch.tensor([0.9, 0.25]).reshape(2, 1, 1, 1, 1)
    assert torch.allclose(x0, x_t - sigma * v, atol=1e-6)
    eps = torch.randn_like(x_t)
    assert torch.allclose(adapter.add_noise(x0, eps, t), (1 - sigma) * x0 + sigma * eps, atol=1e-6)


def test_prepare_batch_sources():
    adapter = wan_adapter()
    zeros = adapter.prepare_batch(wan_batch(batch_size=3), "zeros")
    assert zeros.latents.shape == (3, *LATENT_SHAPE) and not zeros.latents.any()
    assert zeros.batch_size == 3 and zeros.uncond is None
    data = adapter.prepare_batch(wan_batch(with_latents=True), "data")
    assert torch.equal(data.latents, wan_batch(with_latents=True)["latents"])
    with pytest.raises(ValueError, match="no 'latents'"):
        adapter.prepare_batch(wan_batch(), "data")
    with pytest.raises(ValueError, match="latents_source"):
        adapter.prepare_batch(wan_batch(), "noise")
    with pytest.raises(ValueError, match="text_states' or 'prompts"):
        adapter.prepare_batch({"latents": torch.zeros(1, *LATENT_SHAPE)}, "data")
    no_shape = WanAdapter(None, FlowMatchScheduler(1000, 5.0))
    with pytest.raises(ValueError, match="latent_shape"):
        no_shape.prepare_batch(wan_batch())
    assert no_shape.latent_shape(dict(wan_batch(), latent_shape=(16, 1, 2, 2))) == (2, 16, 1, 2, 2)
    with pytest.raises(TypeError, match="scheduler"):
        WanAdapter(None, None)


class _FakeEncoder:
    """encode(prompts) -> (states [B, 4, 64], lens): state value = prompt length + 1."""

    def __init__(self):
        self.calls = 0

    def encode(self, prompts):
        self.calls += 1
        states = torch.stack([torch.full((4, 64), float(len(p) + 1)) for p in prompts])
        return states, torch.full((len(prompts),), 4)


def test_negative_conditioning_sources():
    batch_neg = torch.randn(2, 5, 64)
    adapter = wan_adapter()
    own = adapter.prepare_batch(dict(wan_batch(), negative_text_states=batch_neg))
    assert torch.equal(adapter.negative_cond(own)["text_states"], batch_neg)
    default = adapter.prepare_batch(wan_batch())
    neg = adapter.negative_cond(default)["text_states"]
    assert neg.shape == (2, 6, 64) and torch.equal(neg[0], neg[1])

    encoder = _FakeEncoder()
    with_encoder = WanAdapter(encoder, FlowMatchScheduler(1000, 5.0), latent_shape=LATENT_SHAPE)
    prompted = with_encoder.prepare_batch({"prompts": ["a cat", "a dog!"]})
    assert prompted.cond["text_states"][:, 0, 0].tolist() == [6.0, 7.0]
    for _ in range(2):  # the empty prompt is encoded once
        assert with_encoder.negative_cond(prompted)["text_states"][:, 0, 0].tolist() == [1.0, 1.0]
    assert encoder.calls == 2

    bare = WanAdapter(None, FlowMatchScheduler(1000, 5.0), latent_shape=LATENT_SHAPE)
    with pytest.raises(ValueError, match="unconditional"):
        bare.negative_cond(bare.prepare_batch(wan_batch()))


def test_where_cond_pads_like_the_dit_and_selects_per_sample():
    torch.manual_seed(0)
    net = tiny_wan(1)
    adapter = wan_adapter()
    cond = {"text_states": torch.randn(2, 8, 64)}
    other = {"text_states": torch.randn(2, 6, 64)}
    mixed = adapter.where_cond(torch.tensor([True, False]), cond, other)["text_states"]
    assert mixed.shape == (2, 8, 64)
    assert torch.equal(mixed[0], cond["text_states"][0])
    assert torch.equal(mixed[1, :6], other["text_states"][1]) and not mixed[1, 6:].any()
    # zero padding changes nothing for the DiT (it pads to text_len with zeros itself)
    x, t = torch.randn(1, *LATENT_SHAPE), torch.tensor([500.0])
    assert torch.allclose(net(x, t, mixed[1:]), net(x, t, other["text_states"][1:]))
