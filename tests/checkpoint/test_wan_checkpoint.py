"""Wan DiT checkpoints: detection, reading, tp slices, writing every format, bad inputs."""
import dataclasses
import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megadistill.checkpoint import CheckpointError
from megadistill.models.wan.checkpoint import (convert_wan_checkpoint, detect_format, infer_config, native_shapes,
                                               open_wan_checkpoint, save_wan_checkpoint)
from megadistill.models.wan.config import PRESETS
from megadistill.models.wan.keys import diffusers_to_native, native_to_diffusers, tp_split_dim

from ckpt_helpers import leftovers


def _assert_equal_to(ckpt, state):
    assert ckpt.keys() == list(state)
    for n, t in state.items():
        got = ckpt.load(n)
        assert got.dtype == t.dtype and torch.equal(got, t), n


def _same_but_text_len(a, b):
    # diffusers' config has no text_len (the tokenizer's padding length); reading one gives 512
    return dataclasses.replace(a, text_len=0) == dataclasses.replace(b, text_len=0)


def test_round_trip_native_diffusers_megadistill_native_is_bit_exact(tmp_path, native_dir, tiny, tiny_state):
    convert_wan_checkpoint(native_dir, tmp_path / "diff", "diffusers")
    convert_wan_checkpoint(tmp_path / "diff", tmp_path / "md", "megadistill", tp=2, pp=2)
    convert_wan_checkpoint(tmp_path / "md", tmp_path / "back", "native")
    for path, fmt in [(native_dir, "native"), (tmp_path / "diff", "diffusers"), (tmp_path / "md", "megadistill"),
                      (tmp_path / "back", "native")]:
        assert detect_format(path) == fmt
        with open_wan_checkpoint(path) as ck:
            assert ck.format == fmt and _same_but_text_len(ck.config, tiny)
            _assert_equal_to(ck, tiny_state)
    with safe_open(tmp_path / "diff" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(native_to_diffusers(n) for n in tiny_state)
    assert leftovers(tmp_path) == []


def _check_diffusers_model(model, tiny, tiny_state):
    sd = model.state_dict()
    assert sorted(diffusers_to_native(k) for k in sd) == sorted(tiny_state)
    for k, t in sd.items():
        assert torch.equal(t, tiny_state[diffusers_to_native(k)]), k
    assert model.config.num_attention_heads == tiny.num_heads and model.config.text_dim == tiny.text_dim


def test_diffusers_output_loads_in_diffusers_from_pretrained(tmp_path, native_dir, tiny, tiny_state):
    # diffusers >= 0.3x needs accelerate to load a WanTransformer3DModel (it keeps modules in fp32)
    pytest.importorskip("accelerate", reason="diffusers' WanTransformer3DModel.from_pretrained needs accelerate")
    from diffusers import WanTransformer3DModel
    convert_wan_checkpoint(native_dir, tmp_path / "diff", "diffusers", max_shard_size="1MB")  # sharded + index
    _check_diffusers_model(WanTransformer3DModel.from_pretrained(tmp_path / "diff"), tiny, tiny_state)


def test_diffusers_output_loads_with_diffusers_config_and_strict_state_dict(tmp_path, native_dir, tiny, tiny_state):
    from diffusers import WanTransformer3DModel
    from diffusers.models.model_loading_utils import load_state_dict
    convert_wan_checkpoint(native_dir, tmp_path / "diff", "diffusers")
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(tmp_path / "diff"))
    model.load_state_dict(load_state_dict(tmp_path / "diff" / "diffusion_pytorch_model.safetensors"), strict=True)
    _check_diffusers_model(model, tiny, tiny_state)


def test_native_config_json_round_trips_every_field(native_dir, tiny):
    cfg = json.loads((native_dir / "config.json").read_text())
    assert cfg["_class_name"] == "WanModel" and cfg["text_dim"] == tiny.text_dim
    with open_wan_checkpoint(native_dir) as ck:
        assert ck.config == tiny


def _expected_slice(t, name, r, tp):
    d = tp_split_dim(name)
    return t if d is None else t.chunk(tp, dim=d)[r]


@pytest.mark.parametrize("fmt", ["native", "diffusers", "megadistill"])
def test_tp_slices_equal_slices_of_full_tensor(tmp_path, native_dir, tiny_state, fmt):
    src = native_dir if fmt == "native" else tmp_path / fmt
    if fmt != "native":
        convert_wan_checkpoint(native_dir, src, fmt, **({"tp": 2, "pp": 2} if fmt == "megadistill" else {}))
    with open_wan_checkpoint(src) as ck:
        for tp in (1, 2, 4):
            for name, t in tiny_state.items():
                for r in range(tp):
                    assert torch.equal(ck.load(name, r, tp), _expected_slice(t, name, r, tp)), (name, r, tp)
        assert ck.load("blocks.0.ffn.2.weight", 1, 2, dtype="bf16").dtype == torch.bfloat16


def test_megadistill_layout(tmp_path, native_dir, tiny_state):
    convert_wan_checkpoint(native_dir, tmp_path / "md", "megadistill", tp=2, pp=2)
    m = json.loads((tmp_path / "md" / "manifest.json").read_text())
    assert m["format"] == "megadistill" and m["model_family"] == "wan" and m["role"] == "student"
    assert m["layout"] == {"tp": 2, "pp": 2, "stage_blocks": [[0, 1], [1, 2]]} and m["dtype"] == "fp32"
    assert sorted(m["files"]) == [f"model-tp{r:02d}-pp{s:02d}.safetensors" for r in (0, 1) for s in (0, 1)]

    def places(name):
        return [(s["tp_rank"], s["pp_stage"], s["offset"], s["length"]) for s in m["tensors"][name]["shards"]]
    assert detect_format(tmp_path / "md" / "model-tp01-pp00.safetensors") == "megadistill"
    assert places("time_embedding.0.weight") == [(0, 0, None, None), (0, 1, None, None)]  # every stage, once
    assert places("head.head.weight") == [(0, 1, None, None)]
    assert places("patch_embedding.weight") == [(0, 0, None, None)]
    assert places("blocks.1.ffn.2.weight") == [(0, 1, 0, 128), (1, 1, 128, 128)]  # row split of [128, 256]
    assert places("blocks.0.self_attn.q.weight") == [(0, 0, 0, 64), (1, 0, 64, 64)]
    assert places("blocks.0.self_attn.o.bias") == [(0, 0, None, None)]
    # every part, read with the safetensors library, is the right slice of the full tensor
    for name, e in m["tensors"].items():
        for s in e["shards"]:
            with safe_open(tmp_path / "md" / s["file"], "pt") as f:
                part = f.get_tensor(name)
            d = e["split_dim"]
            want = tiny_state[name] if d is None else tiny_state[name].narrow(d, s["offset"], s["length"])
            assert torch.equal(part, want), (name, s)


def test_megadistill_saved_at_tp2_reads_at_tp4_and_tp1(tmp_path, native_dir, tiny_state):
    convert_wan_checkpoint(native_dir, tmp_path / "md", "megadistill", tp=2, pp=1, dtype="bf16")
    with open_wan_checkpoint(tmp_path / "md") as ck:
        for name, t in tiny_state.items():
            t = t.bfloat16()
            assert torch.equal(ck.load(name), t)
            for r in range(4):
                assert torch.equal(ck.load(name, r, 4), _expected_slice(t, name, r, 4)), name
    convert_wan_checkpoint(tmp_path / "md", tmp_path / "md4", "megadistill", tp=4, pp=2)
    with open_wan_checkpoint(tmp_path / "md4") as ck:
        _assert_equal_to(ck, {n: t.bfloat16() for n, t in tiny_state.items()})


def test_pth_input_and_shape_inference(tmp_path, tiny, tiny_state):
    torch.save(tiny_state, tmp_path / "wan.pth")
    assert detect_format(tmp_path / "wan.pth") == "native"
    with open_wan_checkpoint(tmp_path / "wan.pth", num_heads=4) as ck:
        assert ck.config == dataclasses.replace(tiny, text_len=512) and "num_heads=4 given" in ck.config_source
        _assert_equal_to(ck, tiny_state)
    with open_wan_checkpoint(tmp_path / "wan.pth") as ck:  # no config: head dim 128 convention
        assert ck.config.num_heads == 1 and "dim // 128" in ck.config_source


def test_infer_config_of_public_shapes():
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-ti2v-5b"):
        assert infer_config(native_shapes(PRESETS[name])) == PRESETS[name]


def test_sharded_native_input_with_index(tmp_path, tiny, tiny_state):
    """A folder like Wan2.1-T2V-14B: shards + index written by the safetensors library, a native
    config.json, and unrelated .pth files (text encoder, VAE) that must be left alone."""
    src = tmp_path / "Wan2.1-T2V-tiny"
    src.mkdir()
    names = list(tiny_state)
    parts = [names[:30], names[30:50], names[50:]]
    weight_map = {}
    for i, part in enumerate(parts):
        f = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tiny_state[n] for n in part}, src / f)
        weight_map.update({n: f for n in part})
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({**tiny.to_native(), "text_dim": tiny.text_dim}))
    torch.save({"encoder.weight": torch.zeros(2)}, src / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save({"decoder.weight": torch.zeros(2)}, src / "Wan2.1_VAE.pth")
    with open_wan_checkpoint(src) as ck:
        assert ck.format == "native" and ck.config == tiny
        _assert_equal_to(ck, tiny_state)
    # and our own writer shards by size with an index
    s = convert_wan_checkpoint(src, tmp_path / "out", "native", max_shard_size="1MB")
    assert len([f for f in s["files"] if f.endswith(".safetensors")]) == 3
    assert "diffusion_pytorch_model.safetensors.index.json" in s["files"]
    with open_wan_checkpoint(tmp_path / "out") as ck:
        _assert_equal_to(ck, tiny_state)


def test_diffusers_pipeline_folder_and_single_file(tmp_path, native_dir, tiny_state):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    convert_wan_checkpoint(native_dir, pipe / "transformer", "diffusers")
    assert detect_format(pipe) == "diffusers"
    with open_wan_checkpoint(pipe) as ck:
        _assert_equal_to(ck, tiny_state)
    # a native single file whose name is diffusers-like: told apart by its keys
    f = native_dir / "diffusion_pytorch_model.safetensors"
    assert detect_format(f) == "native"
    assert detect_format(pipe / "transformer" / "diffusion_pytorch_model.safetensors") == "diffusers"


def test_save_from_iterable_any_order_and_dtype(tmp_path, tiny, tiny_state):
    items = list(tiny_state.items())
    random.Random(0).shuffle(items)
    save_wan_checkpoint(iter(items), tmp_path / "md", format="megadistill", config=tiny, tp=2, pp=2,
                        dtype=torch.float16, role="critic")
    with open_wan_checkpoint(tmp_path / "md") as ck:
        _assert_equal_to(ck, {n: t.half() for n, t in tiny_state.items()})
    assert json.loads((tmp_path / "md" / "manifest.json").read_text())["role"] == "critic"
    save_wan_checkpoint(iter(items), tmp_path / "nat", format="native", config=tiny, max_shard_size="500KB")
    with open_wan_checkpoint(tmp_path / "nat") as ck:
        _assert_equal_to(ck, tiny_state)


# --- bad inputs: clear error, nothing left behind -------------------------------------------------------

def _write_native(folder, state, tiny):
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({**tiny.to_native(), "text_dim": tiny.text_dim}))
    return folder


def _convert_fails(src, dst, match, exc=CheckpointError, **kw):
    with pytest.raises(exc, match=match):
        convert_wan_checkpoint(src, dst, kw.pop("to", "megadistill"), **kw)
    assert leftovers(dst.parent) == []


def test_truncated_file(tmp_path, native_dir, tiny_state):
    f = native_dir / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _convert_fails(native_dir, tmp_path / "out", "truncated file")
    torch.save(tiny_state, tmp_path / "wan.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "wan.pth").read_bytes()[:-1000])
    _convert_fails(tmp_path / "cut.pth", tmp_path / "out", r"cannot load with torch.load\(weights_only=True\)")
    assert not (tmp_path / "out").exists()


def test_wrong_shape(tmp_path, tiny, tiny_state):
    bad = dict(tiny_state, **{"blocks.1.ffn.0.weight": torch.zeros(255, 128)})
    src = _write_native(tmp_path / "bad", bad, tiny)
    _convert_fails(src, tmp_path / "out",
                   r"1 with wrong shape: blocks.1.ffn.0.weight \[255, 128\] \(expected \[256, 128\]\)")
    assert not (tmp_path / "out").exists()


def test_missing_and_unexpected_keys(tmp_path, tiny, tiny_state):
    bad = {n: t for n, t in tiny_state.items() if n != "blocks.0.cross_attn.k.bias"}
    bad["blocks.0.lora_A.weight"] = torch.zeros(2)
    src = _write_native(tmp_path / "bad", bad, tiny)
    _convert_fails(src, tmp_path / "out",
                   r"1 missing: blocks.0.cross_attn.k.bias; 1 unexpected: blocks.0.lora_A.weight")
    assert not (tmp_path / "out").exists()


def test_unknown_format(tmp_path):
    (tmp_path / "empty").mkdir()
    _convert_fails(tmp_path / "empty", tmp_path / "out", "unknown checkpoint format: no weight files")
    (tmp_path / "other").mkdir()
    save_file({"encoder.block.0.weight": torch.zeros(2)}, tmp_path / "other" / "model.safetensors")
    _convert_fails(tmp_path / "other", tmp_path / "out", "unknown checkpoint format: no Wan DiT key names")
    _convert_fails(tmp_path / "nowhere", tmp_path / "out", "no such file or folder")
    (tmp_path / "x.txt").write_text("hi")
    _convert_fails(tmp_path / "x.txt", tmp_path / "out", "unknown weight file type")
    assert not (tmp_path / "out").exists()


def test_destination_exists_and_overwrite(tmp_path, native_dir, tiny_state):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    _convert_fails(native_dir, dst, "already exists", exc=FileExistsError)
    assert (dst / "keep.txt").read_text() == "old"
    convert_wan_checkpoint(native_dir, dst, "megadistill", tp=2, overwrite=True)
    assert not (dst / "keep.txt").exists() and leftovers(tmp_path) == []
    with open_wan_checkpoint(dst) as ck:
        _assert_equal_to(ck, tiny_state)


def test_failure_mid_write_leaves_nothing(tmp_path, tiny, tiny_state):
    def stream():
        for i, (n, t) in enumerate(tiny_state.items()):
            yield (n, t if i < 40 else torch.zeros(3))
    with pytest.raises(CheckpointError, match="shape \\[3\\], config expects"):
        save_wan_checkpoint(stream(), tmp_path / "out", format="diffusers", config=tiny)
    with pytest.raises(CheckpointError, match="1 tensors missing from the input"):
        save_wan_checkpoint(iter(list(tiny_state.items())[1:]), tmp_path / "out", format="megadistill", config=tiny)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_layouts(tmp_path, native_dir):
    _convert_fails(native_dir, tmp_path / "out", "tp=3 does not divide num_heads=4", tp=3)
    _convert_fails(native_dir, tmp_path / "out", "cannot split 2 blocks into pp=3", pp=3)
    _convert_fails(native_dir, tmp_path / "out", "apply only to the megadistill format", to="native", tp=2)
    assert not (tmp_path / "out").exists()
