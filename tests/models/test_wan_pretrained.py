"""WanDiT.from_pretrained / save_pretrained across the three formats."""
import pytest
import torch

from megadistill.models.wan import WanDiT, get_preset, init_weights
from megadistill.models.wan.checkpoint import detect_format


@pytest.fixture(scope="module")
def model_and_io():
    cfg = get_preset("tiny").replace(time_embedding_dtype="float32")
    model = init_weights(WanDiT(cfg), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 16, 3, 4, 6, generator=g), torch.tensor([999.0, 20.0]),
              torch.randn(2, 9, cfg.text_dim, generator=g))
    with torch.no_grad():
        out = model(*inputs)
    return model, inputs, out


@pytest.mark.parametrize("fmt", ["native", "diffusers", "megadistill"])
def test_round_trip_each_format(tmp_path, model_and_io, fmt):
    model, inputs, out = model_and_io
    dst = tmp_path / fmt
    model.save_pretrained(dst, format=fmt)
    assert detect_format(dst) == fmt
    loaded = WanDiT.from_pretrained(dst).eval()
    assert loaded.config == model.config
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), out)


def test_diffusers_folder_loads_in_diffusers(tmp_path, model_and_io):
    from diffusers import WanTransformer3DModel
    import torch.nn.functional as F

    model, (x, t, text), out = model_and_io
    model.save_pretrained(tmp_path / "d", format="diffusers")
    ref = WanTransformer3DModel.from_pretrained(tmp_path / "d").eval()
    with torch.no_grad():
        theirs = ref(x, t, F.pad(text, (0, 0, 0, model.config.text_len - text.shape[1])),
                     return_dict=False)[0]
    assert (theirs - out).abs().max().item() <= 1e-5


def test_dtype_and_no_meta_left(tmp_path, model_and_io):
    model, inputs, out = model_and_io
    model.save_pretrained(tmp_path / "n", format="native")
    loaded = WanDiT.from_pretrained(tmp_path / "n", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in loaded.parameters())


def test_existing_destination_is_refused(tmp_path, model_and_io):
    model, _, _ = model_and_io
    model.save_pretrained(tmp_path / "x", format="native")
    with pytest.raises(Exception, match="exists"):
        model.save_pretrained(tmp_path / "x", format="native")
