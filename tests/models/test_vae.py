"""WanVAE: diffusers and native layouts, Wan's latent normalization, stride, errors."""
import json
import shutil

import pytest
import torch

from _tiny_assets import build_tiny_vae, save_diffusers_vae, write_native_vae
from megadistill.models.wan.pretrained_io import CheckpointError
from megadistill.models.wan.vae import (NATIVE_VAE_FILE, WAN21_VAE_CONFIG, WanVAE, vae_diffusers_to_native,
                                        vae_native_to_diffusers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference model, pipeline folder holding vae/, folder holding Wan2.1_VAE.pth)."""
    root = tmp_path_factory.mktemp("vae")
    model = build_tiny_vae(seed=0)
    save_diffusers_vae(model, root / "pipe" / "vae")
    write_native_vae(model, root / "native")
    return model, root / "pipe", root / "native"


def _video(t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


def test_native_key_map_matches_wan21_layout():
    """On the full-size Wan2.1 VAE the inverse map yields Wan's native names (checked against names
    from wan/modules/vae.py and against diffusers' own single-file converter), and round-trips."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        model = AutoencoderKLWan()  # defaults = Wan2.1: base_dim 96, z_dim 16
    config = dict(model.config)
    sd = model.state_dict()
    native = vae_diffusers_to_native(sd, config)
    by_diffusers = convert_wan_vae_to_diffusers(native)
    assert set(by_diffusers) == set(sd)
    assert all(by_diffusers[k] is sd[k] for k in sd)  # the same tensor lands under the same name
    back = vae_native_to_diffusers(native, config)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    # Encoder3d: 2 res blocks per level, Resample after levels 0-2 (temporal from level 1);
    # Decoder3d: 3 res blocks per level, flat index; level 1's first block widens 192 -> 384.
    for key, shape in {"encoder.conv1.weight": (96, 3, 3, 3, 3),
                       "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
                       "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
                       "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
                       "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
                       "encoder.head.2.weight": (32, 384, 3, 3, 3),
                       "conv1.weight": (32, 32, 1, 1, 1), "conv2.weight": (16, 16, 1, 1, 1),
                       "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
                       "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
                       "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
                       "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
                       "decoder.head.0.gamma": (96, 1, 1, 1)}.items():
        assert tuple(native[key].shape) == shape, key
    assert "decoder.upsamples.11.time_conv.weight" not in native  # last upsampler is spatial only
    assert len(native) == len(sd)


def test_diffusers_folder_round_trip(tiny):
    model, pipe, _ = tiny
    vae = WanVAE.from_pretrained(pipe)
    assert torch.equal(WanVAE.from_pretrained(pipe / "vae").model.decoder.conv_out.weight,
                       vae.model.decoder.conv_out.weight)
    for k, v in model.state_dict().items():
        assert torch.equal(vae.model.state_dict()[k], v), k

    video = _video(5, 16, 24)
    mean = torch.tensor(WAN21_VAE_CONFIG["latents_mean"]).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_VAE_CONFIG["latents_std"]).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        mu = model.encode(video).latent_dist.mean
        z = vae.encode(video)
        torch.testing.assert_close(z, (mu - mean) / std, rtol=0, atol=0)
        ref_video = model.decode(z * std + mean).sample
        torch.testing.assert_close(vae.decode(z), ref_video, rtol=1e-6, atol=1e-6)
    assert z.std() > 0.01


def test_native_file_loads_identically(tiny):
    _, pipe, native_dir = tiny
    ref = WanVAE.from_pretrained(pipe)
    video = _video(5, 16, 16, seed=1)
    with torch.no_grad():
        z_ref = ref.encode(video)
        v_ref = ref.decode(z_ref)
        for path in (native_dir, native_dir / NATIVE_VAE_FILE):
            vae = WanVAE.from_pretrained(path)
            assert torch.equal(vae.encode(video), z_ref)
            assert torch.equal(vae.decode(z_ref), v_ref)
    bf16 = WanVAE.from_pretrained(native_dir, dtype=torch.bfloat16)  # (bf16 conv3d is too slow on CPU to run)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.latents_std.dtype == torch.float32


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes_follow_stride(tiny, frames):
    _, pipe, _ = tiny
    vae = WanVAE.from_pretrained(pipe)
    assert vae.stride == (4, 8, 8)
    with torch.no_grad():
        z = vae.encode(_video(frames, 16, 24))
        assert z.shape == (1, 16, 1 + (frames - 1) // 4, 2, 3) == (1, *vae.latent_shape(frames, 16, 24))
        video = vae.decode(z)
    assert video.shape == (1, 3, frames, 16, 24) and video.dtype == torch.float32
    assert video.abs().max() <= 1.0


def test_bad_input_is_rejected(tiny, tmp_path):
    model, pipe, native_dir = tiny
    vae = WanVAE.from_pretrained(pipe)
    with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
        vae.encode(_video(4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(_video(5, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 16, t, h, w\]"):
        vae.decode(torch.zeros(1, 8, 2, 2, 2))

    with pytest.raises(CheckpointError, match="no such file or folder"):
        WanVAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no VAE found"):
        WanVAE.from_pretrained(tmp_path / "empty")

    native = torch.load(native_dir / NATIVE_VAE_FILE, weights_only=True)
    cases = {
        "extra": (dict(native, **{"decoder.upsamples.99.residual.0.gamma": torch.ones(8, 1, 1, 1)}),
                  r"no counterpart.*decoder\.upsamples\.99"),
        "shape": (dict(native, **{"decoder.head.2.weight": torch.zeros(3, 8, 3, 3, 1)}),
                  r"shape mismatch.*decoder\.conv_out\.weight"),
        "missing": ({k: v for k, v in native.items() if k != "encoder.middle.1.proj.bias"},
                    r"missing 1 keys: encoder\.mid_block\.attentions\.0\.proj\.bias"),
    }
    for name, (sd, pattern) in cases.items():
        (tmp_path / name).mkdir()
        torch.save(sd, tmp_path / name / NATIVE_VAE_FILE)
        with pytest.raises(CheckpointError, match=rf"{NATIVE_VAE_FILE}: .*{pattern}"):
            WanVAE.from_pretrained(tmp_path / name)

    broken = tmp_path / "broken"
    shutil.copytree(pipe / "vae", broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: cannot be read"):
        WanVAE.from_pretrained(broken)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        WanVAE.from_pretrained(broken)

    wan22 = tmp_path / "wan22"
    shutil.copytree(pipe / "vae", wan22)
    cfg = json.loads((wan22 / "config.json").read_text())
    (wan22 / "config.json").write_text(json.dumps(dict(cfg, is_residual=True, patch_size=2)))
    with pytest.raises((CheckpointError, ValueError), match="Wan2.1"):
        WanVAE.from_pretrained(wan22)
