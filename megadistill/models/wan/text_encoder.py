"""Wan's text encoder: the UMT5-XXL encoder (transformers ``UMT5EncoderModel``) and its tokenizer.

Encoding a batch of prompts, as Wan does it:

    ids, mask = tokenize(clean(prompts))     # pad with <pad> to text_len, </s> closes each prompt
    h = UMT5Encoder(ids, mask)               # [B, text_len, 4096]
    h[b, lens[b]:] = 0                       # keep only the valid tokens; the DiT sees zero padding

UMT5 differs from T5 in that EVERY layer owns a relative-position bias table (T5 shares layer 0's).
Per layer: x += Attn(RMSNorm(x)) with logits q.k (no 1/sqrt(d) scaling) + bias[bucket(j - i)];
x += W_o(gelu_tanh(W_0 x) * W_1 x) on RMSNorm(x); a final RMSNorm closes the stack.

Two on-disk layouts load:
  * diffusers: ``<pipeline>/text_encoder/{config.json, model*.safetensors}`` + ``<pipeline>/tokenizer/``
    (or a text_encoder folder given directly, tokenizer next to it or inside it);
  * Wan native: ``models_t5_umt5-xxl-enc-bf16.pth`` (the state dict of Wan's own ``T5Encoder``) with
    the tokenizer in ``google/umt5-xxl/`` beside it. Keys are renamed by :func:`native_t5_key_to_hf`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from .pretrained_io import (CheckpointError, assign_state_dict, check_materialized, load_safetensors,
                            load_torch_state_dict, safetensors_files)
from .tokenizer_utils import clean_prompt

NATIVE_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
NATIVE_TOKENIZER_DIR = "google/umt5-xxl"
DEFAULT_TEXT_LEN = 512

# Wan T5Encoder block suffix -> transformers UMT5Block suffix (layer.0 = self-attention, layer.1 = FFN).
# Wan's FFN is fc2(fc1(x) * gelu(gate(x))); transformers' is wo(gelu(wi_0(x)) * wi_1(x)).
_BLOCK_NATIVE_TO_HF = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_NATIVE_TO_HF = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_BLOCK_HF_TO_NATIVE = {v: k for k, v in _BLOCK_NATIVE_TO_HF.items()}
_TOP_HF_TO_NATIVE = {v: k for k, v in _TOP_NATIVE_TO_HF.items()}
_TIED_HF_KEY = "encoder.embed_tokens.weight"  # the same tensor as shared.weight

_NATIVE_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def native_t5_key_to_hf(name: str) -> str:
    """``blocks.3.ffn.gate.0.weight`` -> ``encoder.block.3.layer.1.DenseReluDense.wi_0.weight``."""
    if name in _TOP_NATIVE_TO_HF:
        return _TOP_NATIVE_TO_HF[name]
    m = _NATIVE_BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NATIVE_TO_HF:
        return f"encoder.block.{m.group(1)}.{_BLOCK_NATIVE_TO_HF[m.group(2)]}"
    raise KeyError(f"not a key of Wan's UMT5 encoder: {name!r}")


def hf_t5_key_to_native(name: str) -> str:
    """Inverse of :func:`native_t5_key_to_hf` (``encoder.embed_tokens.weight`` is the tied
    ``shared.weight`` and has no native name of its own)."""
    if name in _TOP_HF_TO_NATIVE:
        return _TOP_HF_TO_NATIVE[name]
    m = _HF_BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_HF_TO_NATIVE:
        return f"blocks.{m.group(1)}.{_BLOCK_HF_TO_NATIVE[m.group(2)]}"
    raise KeyError(f"not a key of transformers' UMT5EncoderModel with a Wan native name: {name!r}")


def native_t5_to_hf_state_dict(sd: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename a Wan native T5 encoder state dict to ``UMT5EncoderModel`` keys (tensors are shared)."""
    out, unknown = {}, []
    for k, v in sd.items():
        try:
            out[native_t5_key_to_hf(k)] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        hint = (" (a shared 'pos_embedding' is T5's layout; Wan's UMT5 has one per block)"
                if "pos_embedding.embedding.weight" in unknown else "")
        raise CheckpointError(f"{source}: {len(unknown)} keys are not Wan UMT5 encoder keys{hint}: "
                              f"{sorted(unknown)[:8]}")
    return out


def hf_t5_to_native_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``UMT5EncoderModel`` keys to Wan's native T5 encoder keys (drops the tied copy)."""
    return {hf_t5_key_to_native(k): v for k, v in sd.items() if k != _TIED_HF_KEY}


def umt5_config_from_native(sd: dict[str, torch.Tensor], source: str = "state dict"):
    """Read the encoder's shape off a native state dict (Wan's files carry no config).

    vocab, d_model <- token_embedding; layers <- block count; d_ff <- ffn.fc1; (buckets, heads) <-
    blocks.0.pos_embedding; d_kv = attn.q rows / heads. Max distance 128 and eps 1e-6 are Wan's
    fixed values (umt5_xxl: vocab 256384, dim 4096, ffn 10240, 64 heads, 24 layers, 32 buckets).
    """
    from transformers import UMT5Config

    def get(key):
        if key not in sd:
            raise CheckpointError(f"{source}: missing {key!r}; not a Wan UMT5 encoder state dict")
        return sd[key]

    vocab, d_model = get("token_embedding.weight").shape
    layers = sorted({int(m.group(1)) for k in sd if (m := _NATIVE_BLOCK_RE.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: block indices must run 0..N-1, found {layers[:8]}...")
    num_buckets, num_heads = get("blocks.0.pos_embedding.embedding.weight").shape
    dim_attn = get("blocks.0.attn.q.weight").shape[0]
    if dim_attn % num_heads:
        raise CheckpointError(f"{source}: attention width {dim_attn} not divisible by {num_heads} heads")
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=dim_attn // num_heads,
                      d_ff=get("blocks.0.ffn.fc1.weight").shape[0], num_layers=len(layers),
                      num_heads=num_heads, relative_attention_num_buckets=num_buckets,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                      layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)


def build_umt5_from_state_dict(config, sd: dict[str, torch.Tensor], source: str):
    """A ``UMT5EncoderModel`` holding exactly the tensors of ``sd`` (UMT5EncoderModel keys)."""
    from transformers import UMT5EncoderModel

    sd = dict(sd)
    if "shared.weight" not in sd and _TIED_HF_KEY in sd:
        sd["shared.weight"] = sd[_TIED_HF_KEY]
    sd.pop(_TIED_HF_KEY, None)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    assign_state_dict(model, sd, source, optional=frozenset({_TIED_HF_KEY}))
    model.encoder.set_input_embeddings(model.shared)  # re-tie after the assign replaced shared.weight
    check_materialized(model, source)
    return model.eval().requires_grad_(False)


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model"))


def resolve_text_encoder_paths(path: str | os.PathLike) -> tuple[str, Path, Path | None]:
    """Find ``(layout, weights, tokenizer_dir)`` for ``path``; layout is "diffusers" (weights = the
    text_encoder folder) or "native" (weights = the .pth file). tokenizer_dir is None when not found."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in (".pth", ".pt", ".bin"):
            raise CheckpointError(f"{p}: expected Wan's {NATIVE_T5_FILE} (a .pth file) or a folder")
        tok = p.parent / NATIVE_TOKENIZER_DIR
        return "native", p, tok if _has_tokenizer(tok) else None
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such file or folder")
    if (p / "text_encoder" / "config.json").is_file():
        return "diffusers", p / "text_encoder", p / "tokenizer" if _has_tokenizer(p / "tokenizer") else None
    if (p / "config.json").is_file():
        for tok in (p.parent / "tokenizer", p):
            if _has_tokenizer(tok):
                return "diffusers", p, tok
        return "diffusers", p, None
    if (p / NATIVE_T5_FILE).is_file():
        tok = p / NATIVE_TOKENIZER_DIR
        return "native", p / NATIVE_T5_FILE, tok if _has_tokenizer(tok) else None
    raise CheckpointError(
        f"{p}: no text encoder found; expected a diffusers pipeline folder (text_encoder/config.json), "
        f"a text_encoder folder (config.json + model*.safetensors), or Wan's {NATIVE_T5_FILE}")


def load_tokenizer(folder: str | os.PathLike):
    """A transformers tokenizer from a local folder (never the hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the folder name
        raise CheckpointError(f"{folder}: cannot load the tokenizer: {e}") from e


def load_diffusers_umt5(folder: Path):
    from transformers import UMT5Config

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder / 'config.json'}: file not found")
    try:
        config = UMT5Config.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{folder / 'config.json'}: not a UMT5 config: {e}") from e
    if config.model_type != "umt5":
        raise CheckpointError(f"{folder / 'config.json'}: model_type is {config.model_type!r}, Wan needs 'umt5'")
    files = safetensors_files(folder, "model")
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    return build_umt5_from_state_dict(config, load_safetensors(files), source)


def load_native_umt5(file: Path):
    native = load_torch_state_dict(file)
    config = umt5_config_from_native(native, str(file))
    return build_umt5_from_state_dict(config, native_t5_to_hf_state_dict(native, str(file)), str(file))


class WanTextEncoder(nn.Module):
    """Frozen UMT5 encoder + tokenizer; :meth:`encode` turns prompts into Wan's text conditioning."""

    def __init__(self, model: nn.Module, tokenizer, text_len: int = DEFAULT_TEXT_LEN):
        super().__init__()
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"WanTextEncoder: tokenizer has {len(tokenizer)} tokens but the encoder's "
                             f"vocabulary is {model.config.vocab_size}; they do not belong together")
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", tokenizer_path: str | os.PathLike | None = None,
                        text_len: int = DEFAULT_TEXT_LEN) -> "WanTextEncoder":
        """Load from a diffusers pipeline/text_encoder folder or Wan's native ``.pth`` (see module doc).

        ``dtype=None`` keeps the dtype stored in the file (bf16 for Wan's release). ``tokenizer_path``
        overrides where the tokenizer is looked for. Nothing is downloaded.
        """
        layout, weights, tok_dir = resolve_text_encoder_paths(path)
        if tokenizer_path is not None:
            tok_dir = Path(tokenizer_path)
        if tok_dir is None:
            where = (weights.parent / NATIVE_TOKENIZER_DIR) if layout == "native" else weights.parent / "tokenizer"
            raise CheckpointError(f"{path}: no tokenizer found (looked in {where}); pass tokenizer_path=")
        model = load_native_umt5(weights) if layout == "native" else load_diffusers_umt5(weights)
        if dtype is not None:
            model = model.to(dtype)
        return cls(model.to(device), load_tokenizer(tok_dir), text_len)

    def tokenize(self, prompts: list[str], text_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenize; returns ids and mask [B, text_len] (long), padded or truncated to text_len
        (a truncated prompt still ends in </s>)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("WanTextEncoder: prompts must be a non-empty list of strings")
        text_len = self.text_len if text_len is None else text_len
        out = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=text_len, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder states [B, L, dim] with every position where ``mask`` is 0 set to exactly zero."""
        device = self.model.shared.weight.device
        ids, mask = ids.to(device), mask.to(device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return states.masked_fill(mask[..., None] == 0, 0.0)

    @torch.no_grad()
    def encode(self, prompts: list[str], text_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [B, text_len, dim], lens [B])``: states past each prompt's ``lens[b]`` tokens (its
        </s> included) are zero, as the DiT expects."""
        ids, mask = self.tokenize(prompts, text_len)
        states = self(ids, mask)
        return states, mask.sum(dim=1).to(states.device)
