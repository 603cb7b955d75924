import pytest

from megadistill.models.wan.checkpoint import random_native_state_dict, save_wan_checkpoint
from megadistill.models.wan.config import PRESETS


@pytest.fixture(scope="session")
def tiny():
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_state(tiny):
    return random_native_state_dict(tiny, seed=0)


@pytest.fixture
def native_dir(tmp_path, tiny, tiny_state):
    """A tiny Wan native folder: config.json + diffusion_pytorch_model.safetensors (native keys)."""
    dst = tmp_path / "native"
    save_wan_checkpoint(tiny_state, dst, format="native", config=tiny)
    return dst

