"""The Wan family: DiT, causal DiT with KV cache, text encoder, VAE, checkpoint formats."""
from .config import PRESETS, WanConfig, get_preset
from .dit import WanDiT, init_weights
from .causal import CausalWanDiT

__all__ = ["PRESETS", "WanConfig", "WanDiT", "get_preset", "init_weights"]
