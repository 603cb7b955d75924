"""Wan2.1's causal 3D VAE (diffusers ``AutoencoderKLWan``) with Wan's latent normalization.

    encode: video [B, 3, 1+4k, 8h, 8w] in [-1, 1] -> mu [B, 16, 1+k, h, w] -> (mu - mean) / std
    decode: z -> z * std + mean -> video [B, 3, 1+4k, 8h, 8w], clamped to [-1, 1]

``mean``/``std`` are Wan's per-channel latent statistics (diffusers' ``latents_mean``/``latents_std``).
The encoder's posterior mean is used, never a sample (Wan does the same). The first frame is encoded
alone and every further 4 frames make one latent frame, hence the 1 + 4k frame counts.

Two on-disk layouts load: a diffusers folder (``<pipeline>/vae/`` or the vae folder itself:
``config.json`` + ``diffusion_pytorch_model*.safetensors``) and Wan's native ``Wan2.1_VAE.pth``,
whose keys :func:`vae_native_to_diffusers_keys` renames.

Native -> diffusers names (Wan2.1 layout; residual blocks are ``residual = [RMS, SiLU, conv, RMS, SiLU,
Dropout, conv]`` natively, hence the odd indices):
    conv1 / conv2                      -> quant_conv / post_quant_conv
    {enc,dec}oder.conv1                -> {enc,dec}oder.conv_in
    {enc,dec}oder.head.0 / head.2      -> {enc,dec}oder.norm_out / conv_out
    {enc,dec}oder.middle.0 / 1 / 2     -> {enc,dec}oder.mid_block.resnets.0 / attentions.0 / resnets.1
    encoder.downsamples.k              -> encoder.down_blocks.k (same flat index)
    decoder.upsamples.k (flat list)    -> decoder.up_blocks.i.resnets.j / decoder.up_blocks.i.upsamplers.0
    residual.0 / 2 / 3 / 6, shortcut   -> norm1 / conv1 / norm2 / conv2, conv_shortcut
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .pretrained_io import (CheckpointError, assign_state_dict, check_materialized, load_safetensors,
                            load_torch_state_dict, safetensors_files)

NATIVE_VAE_FILE = "Wan2.1_VAE.pth"
DIFFUSERS_VAE_STEM = "diffusion_pytorch_model"

# Wan2.1's VAE (wan/modules/vae.py: _video_vae + WanVAE). base_dim and z_dim of a native file are read
# off its tensors; the rest of the structure is fixed by the release.
WAN21_VAE_CONFIG = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
)


def _check_wan21_layout(config: dict, what: str = "the native key map") -> None:
    unsupported = {
        "is_residual": bool(config.get("is_residual", False)),
        "patch_size": config.get("patch_size") is not None,
        "attn_scales": bool(config.get("attn_scales")),
        "decoder_base_dim": config.get("decoder_base_dim") not in (None, config["base_dim"]),
        "dim_mult": len(config["dim_mult"]) != len(config["temperal_downsample"]) + 1,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"VAE config is not Wan2.1's layout (fields {bad}); {what} covers only "
                         f"Wan2.1_VAE.pth-style models (not Wan2.2's residual, patchified VAE)")


def _resblock(nat: str, dif: str, shortcut: bool) -> list[tuple[str, str]]:
    pairs = [(f"{nat}.residual.0", f"{dif}.norm1"), (f"{nat}.residual.2", f"{dif}.conv1"),
             (f"{nat}.residual.3", f"{dif}.norm2"), (f"{nat}.residual.6", f"{dif}.conv2")]
    return pairs + ([(f"{nat}.shortcut", f"{dif}.conv_shortcut")] if shortcut else [])


def _attention(nat: str, dif: str) -> list[tuple[str, str]]:
    return [(f"{nat}.{m}", f"{dif}.{m}") for m in ("norm", "to_qkv", "proj")]


def _resample(nat: str, dif: str, temporal: bool) -> list[tuple[str, str]]:
    # resample.0 is a parameter-free pad/upsample; resample.1 the Conv2d
    pairs = [(f"{nat}.resample.1", f"{dif}.resample.1")]
    return pairs + ([(f"{nat}.time_conv", f"{dif}.time_conv")] if temporal else [])


def _middle_and_head(part: str) -> list[tuple[str, str]]:
    return ([(f"{part}.conv1", f"{part}.conv_in")]
            + _resblock(f"{part}.middle.0", f"{part}.mid_block.resnets.0", False)
            + _attention(f"{part}.middle.1", f"{part}.mid_block.attentions.0")
            + _resblock(f"{part}.middle.2", f"{part}.mid_block.resnets.1", False)
            + [(f"{part}.head.0", f"{part}.norm_out"), (f"{part}.head.2", f"{part}.conv_out")])


def vae_native_module_map(config: dict) -> dict[str, str]:
    """Native module path -> diffusers module path for every module holding parameters, built by walking
    Wan2.1's Encoder3d/Decoder3d construction for ``config`` (diffusers AutoencoderKLWan field names)."""
    _check_wan21_layout(config)
    base, mult, nres = config["base_dim"], list(config["dim_mult"]), config["num_res_blocks"]
    down = list(config["temperal_downsample"])
    last = len(mult) - 1
    pairs = [("conv1", "quant_conv"), ("conv2", "post_quant_conv")]
    pairs += _middle_and_head("encoder") + _middle_and_head("decoder")

    dims = [base * u for u in [1] + mult]  # encoder: flat list, same index on both sides
    k = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(nres):
            pairs += _resblock(f"encoder.downsamples.{k}", f"encoder.down_blocks.{k}", c_in != c_out)
            c_in, k = c_out, k + 1
        if i != last:
            pairs += _resample(f"encoder.downsamples.{k}", f"encoder.down_blocks.{k}", down[i])
            k += 1

    dims = [base * u for u in [mult[-1]] + mult[::-1]]  # decoder: flat native list -> nested blocks
    up = down[::-1]
    k = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            c_in //= 2  # the previous upsampler's conv halves the channels
        for j in range(nres + 1):
            pairs += _resblock(f"decoder.upsamples.{k}", f"decoder.up_blocks.{i}.resnets.{j}", c_in != c_out)
            c_in, k = c_out, k + 1
        if i != last:
            pairs += _resample(f"decoder.upsamples.{k}", f"decoder.up_blocks.{i}.upsamplers.0", up[i])
            k += 1
    return dict(pairs)


def _rename(sd: dict[str, torch.Tensor], module_map: dict[str, str], source: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if module in module_map:
            out[f"{module_map[module]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys have no counterpart in the VAE layout: "
                              f"{sorted(unknown)[:8]}")
    return out


def vae_native_to_diffusers(sd: dict[str, torch.Tensor], config: dict, source: str = "state dict"):
    """Rename a Wan native VAE state dict to AutoencoderKLWan keys (tensors are shared)."""
    return _rename(sd, vae_native_module_map(config), source)


def vae_diffusers_to_native(sd: dict[str, torch.Tensor], config: dict, source: str = "state dict"):
    """Rename AutoencoderKLWan keys to Wan's native VAE keys (inverse of :func:`vae_native_to_diffusers`)."""
    return _rename(sd, {v: k for k, v in vae_native_module_map(config).items()}, source)


def vae_config_from_native(sd: dict[str, torch.Tensor], source: str = "state dict",
                           overrides: dict | None = None) -> dict:
    """Wan2.1's VAE config with base_dim (``encoder.conv1`` out channels) and z_dim (``conv2``) taken
    from the tensors; ``overrides`` replaces any field."""
    for key in ("encoder.conv1.weight", "conv2.weight"):
        if key not in sd:
            raise CheckpointError(f"{source}: missing {key!r}; not a Wan VAE state dict")
    config = dict(WAN21_VAE_CONFIG, base_dim=sd["encoder.conv1.weight"].shape[0], z_dim=sd["conv2.weight"].shape[0])
    config.update(overrides or {})
    return config


def resolve_vae_path(path: str | os.PathLike) -> tuple[str, Path]:
    """``("diffusers", vae folder)`` or ``("native", .pth file)`` for a pipeline folder, a vae folder,
    a folder holding Wan2.1_VAE.pth, or the .pth itself."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in (".pth", ".pt"):
            raise CheckpointError(f"{p}: expected Wan's {NATIVE_VAE_FILE} (a .pth file) or a folder")
        return "native", p
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such file or folder")
    if (p / "vae" / "config.json").is_file():
        return "diffusers", p / "vae"
    if (p / "config.json").is_file():
        return "diffusers", p
    if (p / NATIVE_VAE_FILE).is_file():
        return "native", p / NATIVE_VAE_FILE
    raise CheckpointError(f"{p}: no VAE found; expected a diffusers folder (vae/config.json or config.json "
                          f"+ {DIFFUSERS_VAE_STEM}*.safetensors) or Wan's {NATIVE_VAE_FILE}")


def _build_autoencoder(config: dict, sd: dict[str, torch.Tensor], source: str):
    from diffusers import AutoencoderKLWan

    try:
        with torch.device("meta"):
            model = AutoencoderKLWan.from_config(config)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{source}: cannot build AutoencoderKLWan from its config: {e}") from e
    assign_state_dict(model, sd, source)
    check_materialized(model, source)
    return model.eval().requires_grad_(False)


def load_diffusers_vae(folder: Path):
    from diffusers import AutoencoderKLWan

    try:
        config = dict(AutoencoderKLWan.load_config(str(folder), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{folder / 'config.json'}: cannot read the VAE config: {e}") from e
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise CheckpointError(f"{folder / 'config.json'}: _class_name is {config['_class_name']!r}, "
                              f"expected 'AutoencoderKLWan'")
    try:
        _check_wan21_layout(config, "WanVAE")
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    files = safetensors_files(folder, DIFFUSERS_VAE_STEM)
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    return _build_autoencoder(config, load_safetensors(files), source)


def load_native_vae(file: Path, config_overrides: dict | None = None):
    native = load_torch_state_dict(file)
    config = vae_config_from_native(native, str(file), config_overrides)
    try:
        sd = vae_native_to_diffusers(native, config, str(file))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{file}: {e}") from e
    return _build_autoencoder(config, sd, str(file))


class WanVAE(nn.Module):
    """Frozen AutoencoderKLWan with Wan's latent normalization; see the module docstring."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.config
        _check_wan21_layout(dict(cfg), "WanVAE")
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"WanVAE: latents_mean/std need {cfg.z_dim} entries, got "
                             f"{len(cfg.latents_mean)}/{len(cfg.latents_std)}")
        self.model = model
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape),
                             persistent=False)

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    @property
    def stride(self) -> tuple[int, int, int]:
        """(t, h, w) compression: (4, 8, 8) for Wan2.1."""
        cfg = self.model.config
        spatial = 2 ** (len(cfg.dim_mult) - 1)
        return 2 ** sum(bool(d) for d in cfg.temperal_downsample), spatial, spatial

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", config: dict | None = None) -> "WanVAE":
        """Load a diffusers folder or Wan's native ``Wan2.1_VAE.pth``. ``dtype=None`` keeps the stored
        dtype. ``config`` overrides fields of the config assumed for a native file (ignored otherwise)."""
        layout, where = resolve_vae_path(path)
        model = load_native_vae(where, config) if layout == "native" else load_diffusers_vae(where)
        if dtype is not None:
            # plain nn.Module.to: ModelMixin.to warns about fp32-kept modules, of which this model has none
            model = nn.Module.to(model, dtype=dtype)
        return cls(model).to(device)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[z_dim, t, h, w] of the latents of a ``frames x height x width`` video."""
        st, sh, sw = self.stride
        return self.z_dim, 1 + (frames - 1) // st, height // sh, width // sw

    def _check_video(self, video: torch.Tensor) -> None:
        st, sh, sw = self.stride
        if video.ndim != 5 or video.shape[1] != self.model.config.in_channels:
            raise ValueError(f"WanVAE.encode: video must be [B, {self.model.config.in_channels}, T, H, W], "
                             f"got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % st or h % sh or w % sw:
            raise ValueError(f"WanVAE.encode: need T = 1 + {st}k frames and H, W multiples of {sh}, {sw}; "
                             f"got T={t}, H={h}, W={w}")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalized latents (mu - mean) / std, float32, [B, z_dim, 1+(T-1)/4, H/8, W/8]."""
        self._check_video(video)
        dtype = self.model.quant_conv.weight.dtype
        mu = self.model.encode(video.to(dtype)).latent_dist.mean
        return (mu.float() - self.latents_mean) / self.latents_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Video in [-1, 1], float32, [B, 3, 1+4(t-1), 8h, 8w] from normalized latents [B, z_dim, t, h, w]."""
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"WanVAE.decode: latents must be [B, {self.z_dim}, t, h, w], got {tuple(latents.shape)}")
        dtype = self.model.post_quant_conv.weight.dtype
        z = latents.float() * self.latents_std + self.latents_mean
        return self.model.decode(z.to(dtype)).sample.float()
