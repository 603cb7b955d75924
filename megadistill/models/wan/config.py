"""Shape configuration of the Wan DiT and the presets of the public checkpoints."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan2.x text-to-video DiT.

    Field names follow Wan's native ``config.json`` (``dim``, ``ffn_dim``, ``num_heads`` ...) so a
    native config loads without translation; :meth:`from_diffusers` maps diffusers' names.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024
    # Wan computes the sinusoidal timestep embedding in float64; diffusers in float32. The two
    # differ by ~1e-5 at the output of a 1.3B-wide model. "float32" reproduces diffusers bit for bit.
    time_embedding_dtype: str = "float64"

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.time_embedding_dtype not in ("float64", "float32"):
            raise ValueError(f"WanConfig: time_embedding_dtype={self.time_embedding_dtype!r}; "
                             "use 'float64' (Wan) or 'float32' (diffusers)")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"WanConfig: head_dim={self.head_dim} must be even and >= 6 for 3D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple:
        """Head-dim channels given to RoPE over (t, h, w): d - 4*(d//6), 2*(d//6), 2*(d//6)."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    @property
    def patch_out(self) -> int:
        pt, ph, pw = self.patch_size
        return self.out_dim * pt * ph * pw

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        """Reads a megadistill or Wan-native config dict; unknown keys (``_class_name``,
        ``model_type``, ``window_size`` ...) are ignored, a missing key keeps its default."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # diffusers WanTransformer3DModel config <-> ours
    _DIFFUSERS_NAMES = {
        "ffn_dim": "ffn_dim", "num_layers": "num_layers", "in_dim": "in_channels",
        "out_dim": "out_channels", "text_dim": "text_dim", "freq_dim": "freq_dim",
        "patch_size": "patch_size", "eps": "eps", "cross_attn_norm": "cross_attn_norm",
        "rope_max_seq_len": "rope_max_seq_len",
    }

    # Keys diffusers' WanTransformer3DModel does not take (its from_pretrained ignores them); the
    # text length lives in diffusers' pipeline (max_sequence_length=512), not the transformer.
    _EXTRA_KEYS = ("text_len", "time_embedding_dtype")

    @classmethod
    def from_diffusers(cls, d: dict, text_len: int = 512) -> "WanConfig":
        kw = {ours: d[theirs] for ours, theirs in cls._DIFFUSERS_NAMES.items() if theirs in d}
        kw.update({k: d[k] for k in cls._EXTRA_KEYS if k in d})
        kw.setdefault("text_len", text_len)
        heads = d.get("num_attention_heads", 12)
        kw["num_heads"] = heads
        kw["dim"] = heads * d.get("attention_head_dim", 128)
        for unsupported in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            if d.get(unsupported) is not None:
                raise ValueError(
                    f"diffusers config sets {unsupported}={d[unsupported]!r}: image-conditioned Wan "
                    "(I2V) checkpoints are not supported; use a text-to-video checkpoint")
        return cls(**kw)

    def to_diffusers(self) -> dict:
        d = {theirs: getattr(self, ours) for ours, theirs in self._DIFFUSERS_NAMES.items()}
        d["patch_size"] = list(self.patch_size)
        d.update(_class_name="WanTransformer3DModel", num_attention_heads=self.num_heads,
                 attention_head_dim=self.head_dim, qk_norm="rms_norm_across_heads",
                 image_dim=None, added_kv_proj_dim=None, pos_embed_seq_len=None)
        d.update(self._extra())
        return d

    def diffusers_init_kwargs(self) -> dict:
        """Keyword arguments of ``WanTransformer3DModel(...)`` for this shape."""
        return {k: v for k, v in self.to_diffusers().items()
                if not k.startswith("_") and k not in self._EXTRA_KEYS}

    def _extra(self) -> dict:
        """megadistill-only fields, written only where they differ from Wan's defaults."""
        default = WanConfig()
        return {k: getattr(self, k) for k in self._EXTRA_KEYS if getattr(self, k) != getattr(default, k)}

    def to_native(self) -> dict:
        d = dict(_class_name="WanModel", model_type="t2v", dim=self.dim, ffn_dim=self.ffn_dim,
                 num_heads=self.num_heads, num_layers=self.num_layers, in_dim=self.in_dim,
                 out_dim=self.out_dim, text_dim=self.text_dim, text_len=self.text_len,
                 freq_dim=self.freq_dim, eps=self.eps, patch_size=list(self.patch_size),
                 window_size=[-1, -1], qk_norm=True, cross_attn_norm=self.cross_attn_norm)
        d.update(self._extra())
        return d


PRESETS = {
    # Small enough for unit tests on one CPU core; 4 heads so that tp2 x sp2 divides them.
    "tiny": WanConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=64, text_len=32),
    # The synthetic-world teacher (configs/weights/tiny_teacher, docs/QUALITY.md): "tiny" with
    # twice the depth and FFN width, 1.25M parameters (5 MB in fp32), fast on one CPU core.
    "tiny-teacher": WanConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, text_dim=64, text_len=32),
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # The 1.3B widths with 2 blocks: step-time benchmarks of a real-width model.
    "wan2.1-t2v-1.3b-2layers": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2),
    # Wan2.2 A14B: two experts (high/low noise), each with the 14B shape.
    "wan2.2-t2v-a14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Wan2.2 TI2V-5B: 48-channel latents of the Wan2.2 VAE.
    "wan2.2-ti2v-5b": WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48,
                                out_dim=48),
}


def get_preset(name: str) -> WanConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Wan preset {name!r}; choose one of {sorted(PRESETS)}") from None
