"""What every Triton launcher here checks before it runs (imports triton: load lazily)."""
from __future__ import annotations

from triton.runtime.interpreter import InterpretedFunction


def interpreting(kernel) -> bool:
    """True when ``kernel`` was built for Triton's CPU interpreter (TRITON_INTERPRET=1 was set when
    its module was imported); decided per kernel since the variable is read at decoration time."""
    return isinstance(kernel, InterpretedFunction)


def require_triton_device(t, kernel, what):
    if not (t.is_cuda or interpreting(kernel)):
        raise RuntimeError(f"the triton {what} backend needs CUDA tensors, or TRITON_INTERPRET=1 set "
                           f"before megadistill's triton kernels are first imported to run it on "
                           f"CPU; use backend='reference' (or 'sdpa' for attention) otherwise")
