"""Kernel tests run the Triton kernels on CUDA when there is one, else in Triton's CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when megadistill's triton modules are
first imported; megadistill.kernels imports them lazily, so setting it here is early enough. Should
a module have been imported before in the other mode, it is reloaded.
"""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

for _name in ("megadistill.kernels.triton_utils", "megadistill.kernels.triton_attention",
              "megadistill.kernels.triton_elementwise"):
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
