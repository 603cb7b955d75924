"""The Wan2.1 text-to-video DiT as a plain ``nn.Module``.

Parameter names are Wan's native checkpoint names, so a native state dict loads as is. Numerics
follow Wan: modulation, norms and residual gates in float32, the sinusoidal timestep embedding in
float64, q/k RMSNorm over the full hidden dim (all heads), 3D RoPE with interleaved pairs.
RoPE is applied in float32 with float64-computed angles (Wan and diffusers upcast the whole q/k
tensors to float64; the difference is below 1e-6 relative and the upcast costs a third of the
attention block's memory traffic).

Parallelism is not in this file: functions in ``megadistill.models.wan.parallel`` swap layers
for tensor-parallel ones and wrap attention for Ulysses; the module reads head counts from the
tensors it gets, so it runs unchanged on a head shard.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megadistill import kernels
from megadistill.kernels import attention

from .config import WanConfig


# --- small pieces ---------------------------------------------------------------------------------

class WanRMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps)`` in float32, cast back, times ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (Wan's ``WanLayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def sinusoidal_embedding(dim: int, t: torch.Tensor, precision: str = "float64") -> torch.Tensor:
    """Wan's timestep embedding: ``[cos(t*f), sin(t*f)]`` with ``f_i = 10000^(-i/half)``, returned
    as float32. Wan computes it in float64 (angles reach 1000 rad, where float32 keeps ~1e-4 of
    them); ``precision="float32"`` follows diffusers' ``get_timestep_embedding`` operation by
    operation (``exp(-ln(10000) i / half)`` in float32)."""
    half = dim // 2
    if precision == "float32":
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
        angles = t.float().unsqueeze(-1) * freqs
    else:
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
        angles = t.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def rope_frequencies(head_dim: int, rope_split, max_len: int, theta: float) -> torch.Tensor:
    """Angles ``[max_len, head_dim/2]`` (float64) for the (t, h, w) sections of the head dim; section
    of width ``d`` uses ``pos / theta^(2i/d)``."""
    sections = []
    pos = torch.arange(max_len, dtype=torch.float64)
    for d in rope_split:
        inv = 1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float64) / d)
        sections.append(torch.outer(pos, inv))
    return torch.cat(sections, dim=1)


def rope_cos_sin(config: WanConfig, grid, device, frame_offset: int = 0):
    """cos/sin ``[F*H*W, head_dim/2]`` (float32) for a token grid ``(F, H, W)`` in (f, h, w) order;
    ``frame_offset`` shifts the temporal position (a causal block starting at a later frame)."""
    f, h, w = grid
    ct, ch, cw = (d // 2 for d in config.rope_split)
    if frame_offset + f > config.rope_max_seq_len or max(h, w) > config.rope_max_seq_len:
        raise ValueError(f"token grid {grid} (frame offset {frame_offset}) exceeds rope_max_seq_len="
                         f"{config.rope_max_seq_len}")
    ang = rope_frequencies(config.head_dim, config.rope_split, config.rope_max_seq_len,
                           config.rope_theta)
    at = ang[frame_offset:frame_offset + f, :ct].view(f, 1, 1, ct).expand(f, h, w, ct)
    ah = ang[:h, ct:ct + ch].view(1, h, 1, ch).expand(f, h, w, ch)
    aw = ang[:w, ct + ch:].view(1, 1, w, cw).expand(f, h, w, cw)
    angles = torch.cat([at, ah, aw], dim=-1).reshape(f * h * w, -1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: ``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)``.
    x ``[B, S, H, D]``; cos/sin ``[S, D/2]``."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)


def _per_group(x, *mods):
    """Views that let a per-group modulation ``[B, G, C]`` act on ``x [B, S, C]`` whose S tokens form
    G equal groups: G=1 (one timestep per sample) and G=S (one per token) pass through as
    ``[B, 1|S, C]``; other G (one per latent frame) become ``[B*G, S/G, C]`` against ``[B*G, 1, C]``."""
    b, s, c = x.shape
    g = mods[0].shape[1]
    if g in (1, s):
        return x, mods, None
    return x.reshape(b * g, s // g, c), tuple(m.reshape(b * g, 1, c) for m in mods), (b, s, c)


def adaln_modulate(x, shift, scale, eps):
    """``LayerNorm(x) * (1 + scale) + shift`` in float32, returned in x's dtype, through the fused
    kernel dispatcher (Triton on GPU, PyTorch on CPU)."""
    xv, (sh, sc), shape = _per_group(x, shift, scale)
    y = kernels.modulate(xv, sh, sc, eps)
    return y if shape is None else y.reshape(shape)


def gated_residual(x, y, gate):
    """``x + y * gate`` in float32, returned in x's dtype (fused dispatcher)."""
    xv, (g,), shape = _per_group(x, gate)
    out = kernels.gated_residual(xv, y.reshape(xv.shape), g)
    return out if shape is None else out.reshape(shape)


# --- attention and block ---------------------------------------------------------------------------

class WanAttention(nn.Module):
    """Wan self- or cross-attention: q/k/v/o linears with bias, RMSNorm on q and k over the full
    hidden dim. The number of heads is read from the projected tensor, so under tensor parallel the
    same code runs on a head shard."""

    def __init__(self, dim: int, head_dim: int, eps: float, kv_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        kv_dim = kv_dim or dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        # Replaced by Ulysses / the causal KV-cache path; the default attends over all keys.
        self.attn_fn = attention

    def project_q(self, x):
        return self.norm_q(self.q(x)).unflatten(-1, (-1, self.head_dim))

    def project_kv(self, ctx):
        k = self.norm_k(self.k(ctx)).unflatten(-1, (-1, self.head_dim))
        v = self.v(ctx).unflatten(-1, (-1, self.head_dim))
        return k, v

    def forward(self, x, context=None, rope=None, **attn_kwargs):
        if rope is not None and x.is_cuda and type(self.norm_q) is WanRMSNorm:
            q, k, v = self.project_qkv_fused(x, rope)
        else:
            q = self.project_q(x)
            k, v = self.project_kv(x if context is None else context)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.attn_fn(q, k, v, **attn_kwargs)
        return self.o(out.flatten(-2))

    def project_qkv_fused(self, x, rope):
        """Self-attention q/k/v with q/k RMSNorm and RoPE in one fused kernel each (GPU path; the
        norm spans all heads of this rank, so it is used only without tensor parallelism)."""
        q = kernels.rms_norm_rope(self.q(x), self.norm_q.weight, *rope, eps=self.norm_q.eps)
        k = kernels.rms_norm_rope(self.k(x), self.norm_k.weight, *rope, eps=self.norm_k.eps)
        split = (-1, self.head_dim)
        return q.unflatten(-1, split), k.unflatten(-1, split), self.v(x).unflatten(-1, split)


class WanBlock(nn.Module):
    """adaLN block: six modulation vectors = ``modulation`` table + projected time.
    x += SelfAttn(LN(x)(1+scale1)+shift1) gate1; x += CrossAttn(LN_affine(x), text);
    x += FFN(LN(x)(1+scale2)+shift2) gate2."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanAttention(dim, config.head_dim, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm \
            else nn.Identity()
        self.cross_attn = WanAttention(dim, config.head_dim, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, context, rope, self_attn_kwargs=None):
        """x ``[B, S, C]``; e0 ``[B, G, 6, C]`` projected time (float32); context ``[B, L, C]``."""
        mod = (self.modulation.float().unsqueeze(1) + e0).unbind(2)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        eps = self.norm1.eps
        y = self.self_attn(adaln_modulate(x, shift1, scale1, eps), rope=rope, **(self_attn_kwargs or {}))
        x = gated_residual(x, y, gate1)
        x = x + self.cross_attn(self.norm3(x), context=context)
        y = self.ffn(adaln_modulate(x, shift2, scale2, eps))
        return gated_residual(x, y, gate2)


class WanHead(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(config.dim, config.eps)
        self.head = nn.Linear(config.dim, config.patch_out)
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim ** 0.5)

    def forward(self, x, e):
        """e ``[B, G, C]`` the time embedding (before projection)."""
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).unbind(2)
        return self.head(adaln_modulate(x, shift, scale, self.norm.eps))


class WanRealismHead(nn.Module):
    """DMD2's realism classifier, on a DiT's last hidden states (the input of :class:`WanHead`):
    per token ``w2 . silu(W1 layernorm(x) + b1) + b2``, averaged over the tokens: one logit per
    sample, high for "real". Not part of Wan: a critic built for DMD2's GAN term carries it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.hidden = nn.Linear(dim, dim)
        self.logit = nn.Linear(dim, 1)

    def forward(self, x):
        """x ``[B, S, C]`` -> logits ``[B]`` (float32)."""
        h = F.silu(self.hidden(self.norm(x)))
        return self.logit(h).squeeze(-1).float().mean(dim=1)


# --- the model ------------------------------------------------------------------------------------

class WanDiT(nn.Module):
    """Wan2.1 T2V DiT. ``model(latents [B,16,F,H,W], timestep [B] or [B,F], text_states [B,L,text_dim])``
    returns the flow prediction ``[B,16,F,H,W]``. Text shorter than ``config.text_len`` is padded
    with zeros, as Wan does; the padded tokens are attended to (Wan passes no text mask)."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, config.patch_size, config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(),
                                            nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(config)
        self.realism_head = None  # see add_realism_head
        self.activation_checkpointing = False

    def add_realism_head(self, seed: int = 0) -> "WanDiT":
        """Give the model a :class:`WanRealismHead` (deterministically initialised from ``seed``):
        ``forward(..., return_realism=True)`` then also returns its logits. Its parameters are named
        ``realism_head.*`` and are not part of Wan's checkpoint format."""
        head = WanRealismHead(self.config.dim, self.config.eps)
        with torch.no_grad():
            for name, p in head.named_parameters():
                p.copy_(init_value(f"realism_head.{name}", p.shape, seed).to(p.dtype))
        self.realism_head = head.to(self.patch_embedding.weight.device)
        return self

    # -- pieces the parallel and causal variants reuse --

    def token_grid(self, latents):
        pt, ph, pw = self.config.patch_size
        _, c, f, h, w = latents.shape
        if c != self.config.in_dim:
            raise ValueError(f"latents have {c} channels, the model expects in_dim={self.config.in_dim}")
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {(f, h, w)} is not divisible by patch {self.config.patch_size}")
        return f // pt, h // ph, w // pw

    def embed_tokens(self, latents):
        return self.patch_embedding(latents).flatten(2).transpose(1, 2)

    def embed_text(self, text_states):
        b, n, d = text_states.shape
        if d != self.config.text_dim:
            raise ValueError(f"text_states width {d} != text_dim {self.config.text_dim}")
        if n > self.config.text_len:
            raise ValueError(f"text_states has {n} tokens, more than text_len={self.config.text_len}")
        if n < self.config.text_len:
            text_states = F.pad(text_states, (0, 0, 0, self.config.text_len - n))
        return self.text_embedding(text_states)

    def embed_time(self, timestep, batch: int):
        """timestep ``[B]`` or ``[B, G]`` -> (e ``[B, G, C]``, e0 ``[B, G, 6, C]``), float32."""
        t = torch.as_tensor(timestep)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            t = t[:, None]
        if t.shape[0] != batch or t.ndim != 2:
            raise ValueError(f"timestep of shape {tuple(t.shape)} does not match batch {batch}: "
                             "pass [B] or [B, F]")
        s = sinusoidal_embedding(self.config.freq_dim, t, self.config.time_embedding_dtype)
        e = _linear_f32(self.time_embedding[2], F.silu(_linear_f32(self.time_embedding[0], s)))
        e0 = _linear_f32(self.time_projection[1], F.silu(e)).unflatten(-1, (6, -1))
        return e, e0

    def run_blocks(self, x, e0, context, rope, self_attn_kwargs=None):
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, context, rope, self_attn_kwargs, use_reentrant=False)
            else:
                x = block(x, e0, context, rope, self_attn_kwargs)
        return x

    def unpatchify(self, x, grid):
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.config.out_dim, f * pt,
                                                         h * ph, w * pw)

    def realism(self, x):
        """Logits ``[B]`` of the realism head on hidden states ``x`` (an error without the head)."""
        if self.realism_head is None:
            raise ValueError("this DiT has no realism head: build the role with realism_head: true "
                             "(models.<role>.realism_head in the run config)")
        return self.realism_head(x)

    def forward(self, latents, timestep, text_states, return_realism: bool = False):
        """The flow prediction; with ``return_realism`` the pair ``(flow, realism logits [B])``."""
        grid = self.token_grid(latents)
        x = self.embed_tokens(latents.to(self.patch_embedding.weight.dtype))
        e, e0 = self.embed_time(timestep.to(latents.device) if torch.is_tensor(timestep) else timestep,
                                latents.shape[0])
        if e.shape[1] not in (1, grid[0]):
            raise ValueError(f"per-frame timestep has {e.shape[1]} entries, latents have {grid[0]} frames")
        context = self.embed_text(text_states.to(x.dtype))
        rope = rope_cos_sin(self.config, grid, x.device)
        x = self.run_blocks(x, e0, context, rope)
        out = self.unpatchify(self.head(x, e), grid)
        return (out, self.realism(x)) if return_realism else out

    # -- checkpoints --

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", **_unused):
        """Reads a Wan native checkpoint (file or folder of .safetensors/.pth), a diffusers
        ``WanTransformer3DModel`` folder or a megadistill checkpoint; the format is detected.
        The model is built on the meta device and each tensor loaded into place, so the weights
        are in memory once (on ``device``: a GPU rank loads straight into GPU memory). Under an
        initialized tensor-parallel grid only this rank's shard is read."""
        from .checkpoint import open_wan_checkpoint
        from .loading import build_on_meta
        from .parallel import load_for_grid

        with open_wan_checkpoint(path) as ckpt:
            model = build_on_meta(cls, ckpt.config)
            # tp/sp layers for an initialized grid with tp or sp > 1 (else the model as built), then
            # this rank's shard of every tensor
            model = load_for_grid(model, ckpt, dtype=dtype, device=device)
        return model

    def save_pretrained(self, path, format: str = "megadistill", dtype=None, overwrite: bool = False,
                        role: str = "student"):
        from .checkpoint import save_wan_checkpoint

        save_wan_checkpoint(((k, v.detach()) for k, v in self.state_dict().items()), path,
                            format=format, config=self.config, dtype=dtype, overwrite=overwrite,
                            role=role)


def _linear_f32(layer: nn.Linear, x):
    """The time path runs in float32 whatever the parameter dtype, as Wan does under autocast."""
    return F.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())


def init_value(name: str, shape, seed: int = 0, std: float | None = None) -> torch.Tensor:
    """Deterministic random value of parameter ``name`` for tests and synthetic models: normal with
    std 1/sqrt(fan_in) for weights, 1/sqrt(dim) for modulation tables, small normal for biases, about
    one for norm weights. Seeded per (seed, name), so a parameter's value does not depend on how or
    in which order the model was built (plain, meta, or ZeRO-3 partitioned)."""
    import zlib

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    shape = tuple(shape)
    if name.endswith("modulation"):
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5
    if "norm" in name.split(".")[-2]:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=g) * (std if std is not None else fan_in ** -0.5)
    return 0.02 * torch.randn(shape, generator=g)


def init_weights(model: nn.Module, seed: int = 0, std: float | None = None):
    """Fill every parameter of ``model`` with :func:`init_value`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_value(name, p.shape, seed, std).to(p.dtype))
    return model
