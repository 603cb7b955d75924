"""DMD2's GAN term: the critic's realism head, the generator and critic losses it adds, and the
config rules that tie it to models.critic.realism_head."""
import pytest
import torch
import torch.nn.functional as F

from megadistill.config import ConfigError
from megadistill.methods import DMD2Method
from megadistill.models.wan import WanDiT, get_preset, init_weights

from methods_helpers import LATENT_SHAPE, tiny_wan_bundle, wan_adapter, wan_batch

GAN = {"gan_generator_weight": 0.5, "gan_critic_weight": 0.25}


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *LATENT_SHAPE, generator=g), torch.tensor([300.0, 800.0][:batch]),
            torch.randn(batch, 8, 64, generator=g))


def test_realism_head_leaves_the_flow_unchanged_and_pools_per_token_logits():
    model = init_weights(WanDiT(get_preset("tiny")), seed=3)
    x, t, text = inputs()
    flow = model(x, t, text)
    with pytest.raises(ValueError, match="realism_head"):
        model(x, t, text, return_realism=True)
    model.add_realism_head(seed=3)
    assert {n for n, _ in model.named_parameters() if n.startswith("realism_head.")} == {
        "realism_head.hidden.weight", "realism_head.hidden.bias", "realism_head.logit.weight",
        "realism_head.logit.bias"}
    hidden = []
    model.head.register_forward_hook(lambda mod, args, out: hidden.append(args[0]))
    flow2, logits = model(x, t, text, return_realism=True)
    assert torch.equal(flow, flow2) and logits.shape == (2,)
    h = hidden[-1]                                    # [B, S, dim], the head's input
    per_token = model.realism_head.logit(F.silu(model.realism_head.hidden(
        F.layer_norm(h, (h.shape[-1],), eps=model.config.eps)))).squeeze(-1)
    torch.testing.assert_close(logits, per_token.mean(dim=1), rtol=1e-5, atol=1e-6)
    # deterministic from the seed: a second model gets the same head
    other = init_weights(WanDiT(get_preset("tiny")), seed=3).add_realism_head(seed=3)
    assert torch.equal(other(x, t, text, return_realism=True)[1], logits)


def gan_method(config, bundle=None):
    bundle = bundle or tiny_wan_bundle(("student", "teacher", "critic"))
    critic = bundle["critic"]
    critic.module.add_realism_head(seed=1)
    # the handle's optimizer was built before the head: give it the head's parameters too
    critic.optimizer.add_param_group({"params": list(critic.module.realism_head.parameters())})
    return DMD2Method(bundle, wan_adapter(), {"guidance_scale": 3.0, "guidance_convention": "dmd", **config})


def test_gan_needs_data_latents():
    assert gan_method(GAN).latents_source == "data"
    assert gan_method({}).latents_source == "zeros"


def test_generator_gan_term_adds_weighted_softplus_and_leaves_the_critic_without_gradient():
    gan, plain = gan_method(GAN), gan_method({})
    for m in (gan, plain):  # the same networks in both methods
        m.bundle["student"].module.load_state_dict(gan.bundle["student"].module.state_dict())
        m.bundle["critic"].module.load_state_dict(gan.bundle["critic"].module.state_dict())
    batch = gan.adapter.prepare_batch(wan_batch(with_latents=True), latents_source="data")
    uncond = gan.adapter.negative_cond(batch)

    logits = []
    gan.bundle["critic"].module.realism_head.register_forward_hook(lambda mod, a, out: logits.append(out))
    torch.manual_seed(5)
    loss_gan, logs = gan.generator_loss(batch, uncond, exit_index=1)
    torch.manual_seed(5)
    loss_plain, logs_plain = plain.generator_loss(batch, uncond, exit_index=1)

    expected = F.softplus(-logits[-1]).mean()
    assert logs["gan_generator_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert logs["dmd_grad_mean_abs"] == pytest.approx(logs_plain["dmd_grad_mean_abs"], rel=1e-6)
    assert loss_gan.item() == pytest.approx(loss_plain.item() + 0.5 * expected.item(), rel=1e-6)

    loss_gan.backward()
    loss_plain.backward()
    critic = gan.bundle["critic"].module
    assert all(p.grad is None and p.requires_grad for p in critic.parameters())  # frozen, then restored
    s_gan = [p.grad for p in gan.bundle["student"].module.parameters()]
    s_plain = [p.grad for p in plain.bundle["student"].module.parameters()]
    assert all(g is not None for g in s_gan)
    # the GAN term reaches the student through the critic's input
    assert any(not torch.allclose(a, b) for a, b in zip(s_gan, s_plain))


def test_critic_gan_term_scores_the_noised_real_latents():
    method = gan_method(GAN)
    raw = wan_batch(with_latents=True)
    batch = method.adapter.prepare_batch(raw, latents_source="data")
    logits = []
    critic = method.bundle["critic"].module
    critic.realism_head.register_forward_hook(lambda mod, a, out: logits.append(out))
    torch.manual_seed(7)
    loss, logs = method.critic_loss_and_logs(batch, exit_index=2)
    fake, real = logits
    expected_gan = F.softplus(fake).mean() + F.softplus(-real).mean()
    assert logs["gan_critic_loss"] == pytest.approx(expected_gan.item(), rel=1e-6)
    assert loss.item() == pytest.approx(logs["critic_flow_loss"] + 0.25 * expected_gan.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in critic.realism_head.parameters())
    assert all(p.grad is None for p in method.bundle["student"].module.parameters())

    # other real latents change the real logits only: the flow loss is the same
    raw2 = dict(raw, latents=raw["latents"] + 1.0)
    batch2 = method.adapter.prepare_batch(raw2, latents_source="data")
    torch.manual_seed(7)
    _, logs2 = method.critic_loss_and_logs(batch2, exit_index=2)
    assert logs2["critic_flow_loss"] == pytest.approx(logs["critic_flow_loss"], rel=1e-6)
    assert logs2["gan_critic_loss"] != pytest.approx(logs["gan_critic_loss"], rel=1e-3)


def test_train_step_updates_the_realism_head_and_logs_the_gan_terms():
    method = gan_method({**GAN, "generator_update_interval": 1})
    head = {k: v.clone() for k, v in method.bundle["critic"].module.realism_head.state_dict().items()}
    torch.manual_seed(0)
    logs = method.train_step(wan_batch(with_latents=True), step=0)
    for key in ("generator_loss", "gan_generator_loss", "critic_loss", "gan_critic_loss", "realism_real_prob"):
        assert key in logs, key
    after = method.bundle["critic"].module.realism_head.state_dict()
    assert any(not torch.equal(after[k], head[k]) for k in head)


@pytest.mark.parametrize("config, key", [
    ({"gan_generator_weight": 0.1}, "gan_generator_weight"),
    ({"gan_critic_weight": -0.1}, "gan_critic_weight"),
    ({"gan_generator_weight": "a lot", "gan_critic_weight": 0.1}, "gan_generator_weight"),
])
def test_gan_config_errors(config, key):
    with pytest.raises(ConfigError, match=key):
        DMD2Method(tiny_wan_bundle(("student", "teacher", "critic")), wan_adapter(), config)


def test_gan_has_no_op_graph():
    with pytest.raises(NotImplementedError, match="pp 1"):
        gan_method(GAN).step_graph(0, 2)


def record_critic_timesteps(method):
    """[(timesteps, with_realism)] of every critic forward."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[1].detach().clone(), bool(kwargs.get("return_realism"))))
    method.bundle["critic"].module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_gan_timestep_range_of_its_own():
    config = {**GAN, "gan_max_timestep": 250, "max_timestep": 980}
    method = gan_method(config)
    t = method.sample_gan_timesteps(4096, "cpu")
    assert t.min() >= 20 and t.max() <= 250 and t.float().mean() == pytest.approx(134.5, abs=4)
    assert gan_method(GAN).sample_gan_timesteps(4, "cpu") is None

    plain = gan_method({})
    plain.bundle["student"].module.load_state_dict(method.bundle["student"].module.state_dict())
    plain.bundle["critic"].module.load_state_dict(method.bundle["critic"].module.state_dict())
    batch = method.adapter.prepare_batch(wan_batch(with_latents=True), latents_source="data")
    uncond = method.adapter.negative_cond(batch)
    calls = record_critic_timesteps(method)
    torch.manual_seed(5)
    _, logs = method.generator_loss(batch, uncond, exit_index=1)
    torch.manual_seed(5)
    _, logs_plain = plain.generator_loss(batch, uncond, exit_index=1)
    # the fake score keeps the DMD timesteps (the same DMD gradient); the classifier sees its own
    assert logs["dmd_grad_mean_abs"] == pytest.approx(logs_plain["dmd_grad_mean_abs"], rel=1e-6)
    assert [realism for _, realism in calls] == [False, True]
    assert calls[1][0].max() <= 250 and not torch.equal(calls[0][0], calls[1][0])

    calls.clear()
    method.critic_loss_and_logs(batch, exit_index=2)
    assert [realism for _, realism in calls] == [False, True, True]  # flow; fake and real logits
    assert all(t.max() <= 250 for t, realism in calls if realism)


@pytest.mark.parametrize("config, match", [
    ({"gan_max_timestep": 300}, "GAN term's timesteps, which is off"),
    ({**GAN, "gan_max_timestep": 10}, "larger than min_timestep"),
    ({**GAN, "gan_max_timestep": 2000}, "gan_max_timestep"),
])
def test_gan_max_timestep_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        DMD2Method(tiny_wan_bundle(("student", "teacher", "critic")), wan_adapter(), config)
