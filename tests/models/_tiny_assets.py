"""Tiny random stand-ins for Wan's text encoder and VAE files, in both on-disk layouts."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megadistill.models.wan.text_encoder import NATIVE_T5_FILE, NATIVE_TOKENIZER_DIR, hf_t5_to_native_state_dict
from megadistill.models.wan.tokenizer_utils import build_tiny_text_encoder
from megadistill.models.wan.vae import NATIVE_VAE_FILE, WAN21_VAE_CONFIG, vae_diffusers_to_native

TINY_TEXT = dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, d_ff=48)
TINY_VAE = dict(WAN21_VAE_CONFIG, base_dim=8)  # Wan2.1's structure with 8/16/32/32 channels


def tiny_text_encoder_pipeline(root: Path, seed: int = 0) -> Path:
    """A diffusers-style folder: root/text_encoder + root/tokenizer."""
    return build_tiny_text_encoder(root, seed=seed, **TINY_TEXT)


def write_native_text_encoder(pipeline: Path, ckpt_dir: Path) -> Path:
    """Wan's native layout of the same weights: ckpt_dir/models_t5_umt5-xxl-enc-bf16.pth and the
    tokenizer in ckpt_dir/google/umt5-xxl/."""
    from safetensors.torch import load_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    hf = load_file(str(pipeline / "text_encoder" / "model.safetensors"))
    torch.save(hf_t5_to_native_state_dict(hf), ckpt_dir / NATIVE_T5_FILE)
    shutil.copytree(pipeline / "tokenizer", ckpt_dir / NATIVE_TOKENIZER_DIR)
    return ckpt_dir


def build_tiny_vae(seed: int = 0, **overrides):
    """A random AutoencoderKLWan; every tensor perturbed so that no weight is a constant
    (diffusers initialises norm gains to one, which would hide a swapped norm)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(**dict(TINY_VAE, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_diffusers_vae(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_native_vae(model, ckpt_dir: Path) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    native = vae_diffusers_to_native(model.state_dict(), dict(model.config))
    path = ckpt_dir / NATIVE_VAE_FILE
    torch.save(native, path)
    return path
