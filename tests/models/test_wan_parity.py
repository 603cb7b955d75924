"""WanDiT against diffusers' WanTransformer3DModel holding the same weights (fp32, CPU)."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from megadistill.models.wan import WanDiT, get_preset, init_weights
from megadistill.models.wan.dit import sinusoidal_embedding
from megadistill.models.wan.keys import expected_native_keys, native_to_diffusers

TOL = 1e-5


def diffusers_twin(model: WanDiT) -> WanTransformer3DModel:
    ref = WanTransformer3DModel(**model.config.diffusers_init_kwargs()).eval()
    ref.load_state_dict({native_to_diffusers(k): v for k, v in model.state_dict().items()}, strict=True)
    return ref


def run_pair(model, ref, b, f, h, w, text_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(b, cfg.in_dim, f, h, w, generator=g)
    t = torch.rand(b, generator=g) * 1000
    text = torch.randn(b, text_tokens, cfg.text_dim, generator=g)
    ours = model(x, t, text)
    # diffusers' pipeline pads prompt embeddings with zeros to text_len before the transformer;
    # WanDiT does the padding itself, as Wan's native model does.
    theirs = ref(x, t, F.pad(text, (0, 0, 0, cfg.text_len - text_tokens)), return_dict=False)[0]
    return ours, theirs


# (batch, frames, height, width, text tokens): batch > 1, odd F, non-square, short text
SHAPES = [(2, 3, 4, 6, 20), (1, 5, 6, 4, 32), (3, 1, 2, 2, 1), (2, 7, 8, 4, 7)]


@pytest.mark.parametrize("shape", SHAPES)
def test_tiny_matches_diffusers(shape):
    cfg = get_preset("tiny").replace(time_embedding_dtype="float32")
    model = init_weights(WanDiT(cfg), seed=1).eval()
    ref = diffusers_twin(model)
    with torch.no_grad():
        ours, theirs = run_pair(model, ref, *shape)
    assert ours.shape == theirs.shape == (shape[0], 16, shape[1], shape[2], shape[3])
    assert (ours - theirs).abs().max().item() <= TOL


def test_1p3b_widths_two_layers_match_diffusers():
    cfg = get_preset("wan2.1-t2v-1.3b").replace(num_layers=2, time_embedding_dtype="float32")
    model = init_weights(WanDiT(cfg), seed=2).eval()
    ref = diffusers_twin(model)
    with torch.no_grad():
        ours, theirs = run_pair(model, ref, 2, 3, 4, 6, 40)
    assert theirs.abs().max() > 0.1  # a non-trivial output
    assert (ours - theirs).abs().max().item() <= TOL


def test_gradients_match_diffusers():
    cfg = get_preset("tiny").replace(time_embedding_dtype="float32")
    model = init_weights(WanDiT(cfg), seed=3)
    ref = diffusers_twin(model)
    ours, theirs = run_pair(model, ref, 2, 3, 4, 4, 10)
    w = torch.randn_like(ours)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = ref_params[native_to_diffusers(name)]
        assert torch.allclose(p.grad, q.grad, atol=TOL, rtol=1e-4), name


def test_float64_time_embedding_is_wan_and_close_to_diffusers():
    """Default precision follows Wan (float64 sinusoid); it differs from diffusers' float32 only at
    the 1e-5 level."""
    t = torch.tensor([0.0, 1.0, 999.0, 937.5])
    s = sinusoidal_embedding(256, t)
    half = torch.arange(128, dtype=torch.float64)
    ang = t.double()[:, None] * torch.pow(10000.0, -half / 128)
    assert torch.equal(s, torch.cat([ang.cos(), ang.sin()], 1).float())
    cfg = get_preset("tiny")
    model = init_weights(WanDiT(cfg), seed=4).eval()
    ref = diffusers_twin(model)
    with torch.no_grad():
        ours, theirs = run_pair(model, ref, 2, 3, 4, 6, 20)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_state_dict_uses_native_names_in_order():
    cfg = get_preset("tiny")
    assert list(WanDiT(cfg).state_dict()) == expected_native_keys(cfg.num_layers)


def test_per_frame_timesteps_equal_broadcast_timestep():
    cfg = get_preset("tiny")
    model = init_weights(WanDiT(cfg), seed=5).eval()
    x = torch.randn(2, 16, 3, 4, 4)
    t = torch.tensor([100.0, 700.0])
    text = torch.randn(2, 8, cfg.text_dim)
    with torch.no_grad():
        a = model(x, t, text)
        b = model(x, t[:, None].expand(2, 3), text)
        c = model(x, torch.tensor([[100.0, 100.0, 100.0], [700.0, 700.0, 5.0]]), text)
    # Same math, different batching of the time MLP: equal up to float rounding.
    assert (a - b).abs().max().item() <= 1e-5
    # A different timestep on the last frame of sample 1 changes that sample only.
    assert (c[0] - b[0]).abs().max() <= 1e-5
    assert (c[1] - b[1]).abs().max() > 1e-3


def test_bad_inputs_are_named():
    cfg = get_preset("tiny")
    model = WanDiT(cfg)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 1, 2, 2), torch.tensor([1.0]), torch.randn(1, 4, cfg.text_dim))
    with pytest.raises(ValueError, match="text_len"):
        model(torch.randn(1, 16, 1, 2, 2), torch.tensor([1.0]), torch.randn(1, 99, cfg.text_dim))
    with pytest.raises(ValueError, match="patch"):
        model(torch.randn(1, 16, 1, 3, 2), torch.tensor([1.0]), torch.randn(1, 4, cfg.text_dim))


def test_fused_qk_norm_rope_path_equals_unfused():
    """The GPU path of self-attention (fused q/k RMSNorm + RoPE) computes the same q, k, v; on CPU the
    dispatcher runs its PyTorch reference, which checks the wiring (weights, eps, head split)."""
    from megadistill.models.wan.dit import apply_rope, rope_cos_sin

    cfg = get_preset("tiny")
    attn = init_weights(WanDiT(cfg), seed=6).blocks[0].self_attn
    x = torch.randn(2, 3 * 2 * 2, cfg.dim)
    rope = rope_cos_sin(cfg, (3, 2, 2), x.device)
    q, k, v = attn.project_qkv_fused(x, rope)
    k_ref, v_ref = attn.project_kv(x)
    assert (q - apply_rope(attn.project_q(x), *rope)).abs().max() <= 1e-5
    assert (k - apply_rope(k_ref, *rope)).abs().max() <= 1e-5
    assert torch.equal(v, v_ref)


@pytest.mark.gpu
def test_cuda_dit_matches_diffusers():
    cfg = get_preset("wan2.1-t2v-1.3b").replace(num_layers=2, time_embedding_dtype="float32")
    model = init_weights(WanDiT(cfg), seed=2).eval()
    ref = diffusers_twin(model).cuda()
    model = model.cuda()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, generator=g).cuda()
    t = torch.tensor([500.0]).cuda()
    text = torch.randn(1, 64, cfg.text_dim, generator=g).cuda()
    with torch.no_grad():
        ours = model(x, t, text)
        theirs = ref(x, t, F.pad(text, (0, 0, 0, cfg.text_len - 64)), return_dict=False)[0]
    assert (ours - theirs).abs().max().item() <= 1e-3  # TF32 / fused-kernel rounding on GPU
