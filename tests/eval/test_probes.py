import pytest
import torch

from megadistill.config import load_config
from megadistill.eval.probes import direction_gain
from megadistill.eval.quality import build_adapter, load_role_model, world_of


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "run.yaml"
    path.write_text("recipe: {method: finetune}\nmodels: {student: {preset: tiny}}\n"
                    "pipeline_config: {latent_shape: [16, 4, 8, 8], text_len: 40, text_encoder: tiny}\n"
                    "data: {kind: synthetic}\n")
    cfg = load_config(str(path))
    model = load_role_model(cfg, "student")
    return model, build_adapter(cfg, {"student": model}), world_of(cfg)


def test_a_model_that_reads_the_text_has_a_nonzero_direction_gain(tiny):
    model, adapter, world = tiny
    gain = direction_gain(model, adapter, world, sigmas=(0.5, 0.95), repeats=1)
    assert set(gain) == {0.5, 0.95}
    assert all(abs(v) > 1e-7 for v in gain.values()), gain


def test_a_model_blind_to_the_text_has_zero_gain(tiny):
    model, adapter, world = tiny
    blind = type(model)(model.config)
    blind.load_state_dict(model.state_dict())
    for block in blind.blocks:  # cross-attention adds exactly nothing: the caption cannot matter
        torch.nn.init.zeros_(block.cross_attn.o.weight)
        torch.nn.init.zeros_(block.cross_attn.o.bias)
    gain = direction_gain(blind.eval(), adapter, world, sigmas=(0.5, 0.95), repeats=1)
    assert all(v == 0.0 for v in gain.values()), gain


def test_bad_arguments(tiny):
    model, adapter, world = tiny
    with pytest.raises(ValueError, match="repeats"):
        direction_gain(model, adapter, world, repeats=0)
    with pytest.raises(ValueError, match="sigmas"):
        direction_gain(model, adapter, world, sigmas=(1.5,))
