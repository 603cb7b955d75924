"""Attention and fused elementwise kernels, with plain PyTorch fallbacks.

Triton is imported only when a triton backend runs, so ``TRITON_INTERPRET=1`` (Triton's CPU
interpreter) can still be set after this package is imported.
"""
from .attention import attention, build_mask, resolve_backend, visible_pairs
from .elementwise import gated_residual, modulate, rms_norm_rope

__all__ = ["attention", "build_mask", "gated_residual", "modulate", "resolve_backend",
           "rms_norm_rope", "visible_pairs"]
