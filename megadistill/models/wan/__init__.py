"""The Wan family: DiT, causal DiT with KV cache, text encoder, VAE, checkpoint formats."""
from .causal import CausalWanDiT
from .config import PRESETS, WanConfig, get_preset
from .dit import WanDiT, init_weights

__all__ = ["PRESETS", "CausalWanDiT", "WanConfig", "WanDiT", "get_preset", "init_weights"]
