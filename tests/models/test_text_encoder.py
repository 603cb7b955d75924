"""WanTextEncoder: key map against Wan's T5 encoder, both file layouts, encode() semantics, errors."""
import filecmp
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from _tiny_assets import TINY_TEXT, tiny_text_encoder_pipeline, write_native_text_encoder
from megadistill.models.wan.pretrained_io import CheckpointError
from megadistill.models.wan.text_encoder import (NATIVE_T5_FILE, NATIVE_TOKENIZER_DIR, WanTextEncoder,
                                                 hf_t5_key_to_native, native_t5_key_to_hf,
                                                 native_t5_to_hf_state_dict, umt5_config_from_native)
from megadistill.models.wan.tokenizer_utils import build_tiny_text_encoder, clean_prompt, tiny_corpus

PROMPTS = ["a cat walks slowly along the sandy beach at sunset, cinematic lighting.",
           "three astronauts",
           "  a robot   spins in circles on a rainy village square &amp; waves  "]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return tiny_text_encoder_pipeline(tmp_path_factory.mktemp("umt5") / "pipe")


# ---------------------------------------------------------------------------------------------
# An independent re-implementation of Wan's T5Encoder forward (wan/modules/t5.py, shared_pos=False),
# reading Wan's native key names directly.

def _wan_bucket(rel: torch.Tensor, num_buckets: int, max_dist: int) -> torch.Tensor:
    half = num_buckets // 2  # bidirectional: one half of the buckets per direction
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def wan_t5_encoder_reference(sd, ids, mask, max_dist=128):
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    b, n = ids.shape
    x = sd["token_embedding.weight"][ids]
    pos = torch.arange(n)
    rel = pos[None, :] - pos[:, None]  # key position minus query position
    for i in range(layers):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        table = p("pos_embedding.embedding.weight")  # [buckets, heads]
        heads = table.shape[1]
        bias = table[_wan_bucket(rel, table.shape[0], max_dist)].permute(2, 0, 1)  # [heads, n, n]
        h = _rms(x, p("norm1.weight"))
        q, k, v = (torch.einsum("bnc,dc->bnd", h, p(f"attn.{m}.weight")).view(b, n, heads, -1) for m in "qkv")
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias  # T5: no 1/sqrt(d) scaling
        logits = logits.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("bnij,bjnc->binc", logits.softmax(-1), v).reshape(b, n, -1)
        x = x + attn @ p("attn.o.weight").T
        h = _rms(x, p("norm2.weight"))
        x = x + ((h @ p("ffn.fc1.weight").T) * _gelu_tanh(h @ p("ffn.gate.0.weight").T)) @ p("ffn.fc2.weight").T
    return _rms(x, sd["norm.weight"])


def random_native_t5(vocab, dim, ffn, heads, layers, buckets=32, seed=0):
    """A random state dict in Wan's native T5Encoder layout (names written from wan/modules/t5.py)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: std * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"token_embedding.weight": r(vocab, dim), "norm.weight": 1 + r(dim, std=0.1)}
    for i in range(layers):
        sd.update({
            f"blocks.{i}.norm1.weight": 1 + r(dim, std=0.1),
            f"blocks.{i}.attn.q.weight": r(dim, dim, std=dim ** -0.5),
            f"blocks.{i}.attn.k.weight": r(dim, dim, std=dim ** -0.5),
            f"blocks.{i}.attn.v.weight": r(dim, dim, std=dim ** -0.5),
            f"blocks.{i}.attn.o.weight": r(dim, dim, std=dim ** -0.5),
            f"blocks.{i}.norm2.weight": 1 + r(dim, std=0.1),
            f"blocks.{i}.ffn.gate.0.weight": r(ffn, dim, std=dim ** -0.5),
            f"blocks.{i}.ffn.fc1.weight": r(ffn, dim, std=dim ** -0.5),
            f"blocks.{i}.ffn.fc2.weight": r(dim, ffn, std=ffn ** -0.5),
            f"blocks.{i}.pos_embedding.embedding.weight": r(buckets, heads, std=0.5),
        })
    return sd


def _write_native(ckpt: Path, sd, pipeline: Path) -> Path:
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(sd, ckpt / NATIVE_T5_FILE)
    if not (ckpt / NATIVE_TOKENIZER_DIR).exists():
        shutil.copytree(pipeline / "tokenizer", ckpt / NATIVE_TOKENIZER_DIR)
    return ckpt


# ---------------------------------------------------------------------------------------------

def test_native_map_matches_wan_t5_forward(pipeline, tmp_path):
    """Native weights loaded through the key map into UMT5EncoderModel reproduce Wan's T5 encoder."""
    sd = random_native_t5(vocab=TINY_TEXT["vocab_size"], dim=32, ffn=40, heads=4, layers=3)
    enc = WanTextEncoder.from_pretrained(_write_native(tmp_path / "ckpt", sd, pipeline))
    assert enc.model.config.num_layers == 3 and enc.model.config.d_ff == 40

    g = torch.Generator().manual_seed(1)
    n = 60  # long enough for relative distances in the logarithmic buckets (>= 8)
    ids = torch.randint(3, TINY_TEXT["vocab_size"], (3, n), generator=g)
    lens = torch.tensor([n, 37, 5])
    mask = (torch.arange(n)[None] < lens[:, None]).long()
    ours = enc(ids, mask)
    ref = wan_t5_encoder_reference(sd, ids, mask)
    for b, length in enumerate(lens.tolist()):
        torch.testing.assert_close(ours[b, :length], ref[b, :length], atol=1e-5, rtol=1e-5)
        if length < n:
            assert ours[b, length:].abs().max().item() == 0.0
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero tensors


def test_umt5_xxl_layout_and_key_map():
    """Wan's real umt5-xxl shapes give UMT5-XXL's config, and the map covers UMT5EncoderModel exactly."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        native = random_native_t5(vocab=256384, dim=4096, ffn=10240, heads=64, layers=24)
    config = umt5_config_from_native(native)
    assert (config.vocab_size, config.d_model, config.d_ff, config.num_heads, config.d_kv, config.num_layers,
            config.relative_attention_num_buckets) == (256384, 4096, 10240, 64, 64, 24, 32)
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    hf_keys = set(model.state_dict()) - {"encoder.embed_tokens.weight"}
    converted = native_t5_to_hf_state_dict(native)
    assert set(converted) == hf_keys
    assert all(converted[k].shape == model.state_dict()[k].shape for k in converted)
    assert {hf_t5_key_to_native(k) for k in hf_keys} == set(native)
    assert native_t5_key_to_hf("blocks.23.pos_embedding.embedding.weight") == \
        "encoder.block.23.layer.0.SelfAttention.relative_attention_bias.weight"


def test_encode_zeroes_padding_and_counts_tokens(pipeline):
    import sentencepiece as spm

    enc = WanTextEncoder.from_pretrained(pipeline)
    sp = spm.SentencePieceProcessor(model_file=str(pipeline / "tokenizer" / "spiece.model"))
    states, lens = enc.encode(PROMPTS, text_len=40)
    assert states.shape == (3, 40, TINY_TEXT["d_model"]) and lens.dtype == torch.long
    expected = [len(sp.encode(clean_prompt(p))) + 1 for p in PROMPTS]  # + </s>
    assert lens.tolist() == expected
    for b, length in enumerate(expected):
        assert states[b, length:].abs().max().item() == 0.0
        assert (states[b, :length].abs().sum(-1) > 0).all()

    # Each prompt's valid states do not depend on the batch or on how far it is padded.
    alone, alone_len = enc.encode(PROMPTS[1:2], text_len=24)
    assert alone_len.item() == expected[1]
    torch.testing.assert_close(alone[0, :expected[1]], states[1, :expected[1]], atol=1e-5, rtol=1e-5)

    # Truncation keeps text_len tokens, the last one </s>.
    ids, mask = enc.tokenize(PROMPTS[:1], text_len=8)
    assert mask.sum().item() == 8 and ids[0, -1].item() == enc.tokenizer.eos_token_id == 1

    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("a single string")


def test_tokenizer_matches_sentencepiece_and_wan_cleaning(pipeline):
    import sentencepiece as spm

    enc = WanTextEncoder.from_pretrained(pipeline)
    sp = spm.SentencePieceProcessor(model_file=str(pipeline / "tokenizer" / "spiece.model"))
    assert (enc.tokenizer.pad_token_id, enc.tokenizer.eos_token_id, enc.tokenizer.unk_token_id) == (0, 1, 2)
    for text in tiny_corpus()[::97] + ["Zebra 42 üñí 東京", "x"]:
        assert enc.tokenizer(text)["input_ids"] == sp.encode(text) + [1], text
    assert clean_prompt("  a\tcat &amp;amp; a\n\n dog  ") == "a cat & a dog"


def test_build_tiny_text_encoder_is_deterministic_and_fast(tmp_path):
    build_tiny_text_encoder(tmp_path / "warm", **TINY_TEXT)  # first call pays lazy imports
    start = time.perf_counter()
    build_tiny_text_encoder(tmp_path / "a", **TINY_TEXT)
    elapsed = time.perf_counter() - start
    build_tiny_text_encoder(tmp_path / "b", **TINY_TEXT)
    build_tiny_text_encoder(tmp_path / "c", seed=1, **TINY_TEXT)
    files = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == ["text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/spiece.model",
                     "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == []
    assert not filecmp.cmp(tmp_path / "a/text_encoder/model.safetensors",
                           tmp_path / "c/text_encoder/model.safetensors", shallow=False)
    assert elapsed < 2.0
    assert not list(tmp_path.glob("a/.tmp-*"))  # temporary folders were renamed away


def test_all_layouts_load_to_the_same_encoder(pipeline, tmp_path):
    native_dir = write_native_text_encoder(pipeline, tmp_path / "native")
    paths = [pipeline, pipeline / "text_encoder", native_dir, native_dir / NATIVE_T5_FILE]
    outs = [WanTextEncoder.from_pretrained(p).encode(PROMPTS, text_len=32) for p in paths]
    for states, lens in outs[1:]:
        assert torch.equal(states, outs[0][0]) and torch.equal(lens, outs[0][1])

    bf16 = WanTextEncoder.from_pretrained(native_dir, dtype=torch.bfloat16)
    states, _ = bf16.encode(PROMPTS, text_len=32)
    assert states.dtype == torch.bfloat16
    torch.testing.assert_close(states.float(), outs[0][0], atol=0.15, rtol=0.05)


def test_errors_name_the_file_and_the_problem(pipeline, tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        WanTextEncoder.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no text encoder found"):
        WanTextEncoder.from_pretrained(tmp_path / "empty")

    sd = random_native_t5(vocab=TINY_TEXT["vocab_size"], dim=32, ffn=40, heads=4, layers=2)
    wrong_key = dict(sd)
    wrong_key["blocks.1.ffn.gate.weight"] = wrong_key.pop("blocks.1.ffn.gate.0.weight")
    ckpt = _write_native(tmp_path / "wrong_key", wrong_key, pipeline)
    with pytest.raises(CheckpointError, match=rf"{NATIVE_T5_FILE}.*blocks\.1\.ffn\.gate\.weight"):
        WanTextEncoder.from_pretrained(ckpt)

    bad_shape = dict(sd, **{"blocks.1.ffn.fc2.weight": torch.zeros(32, 39)})
    ckpt = _write_native(tmp_path / "bad_shape", bad_shape, pipeline)
    with pytest.raises(CheckpointError, match=rf"{NATIVE_T5_FILE}.*shape mismatch.*DenseReluDense\.wo"):
        WanTextEncoder.from_pretrained(ckpt)

    missing = {k: v for k, v in sd.items() if k != "blocks.0.norm2.weight"}
    ckpt = _write_native(tmp_path / "missing", missing, pipeline)
    with pytest.raises(CheckpointError, match=r"missing 1 keys: encoder\.block\.0\.layer\.1\.layer_norm"):
        WanTextEncoder.from_pretrained(ckpt)

    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    torch.save(sd, no_tok / NATIVE_T5_FILE)
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        WanTextEncoder.from_pretrained(no_tok)

    # diffusers folder: a truncated safetensors file and a T5 (not UMT5) config
    broken = tmp_path / "broken"
    shutil.copytree(pipeline, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be read as safetensors"):
        WanTextEncoder.from_pretrained(broken)
    t5 = tmp_path / "t5"
    shutil.copytree(pipeline, t5)
    cfg = json.loads((t5 / "text_encoder" / "config.json").read_text())
    (t5 / "text_encoder" / "config.json").write_text(json.dumps(dict(cfg, model_type="t5")))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        WanTextEncoder.from_pretrained(t5)


def test_named_tiny_encoders_differ_only_in_relative_position_tables(tmp_path):
    from megadistill.config import ConfigError
    from megadistill.models.wan.family import load_text_encoder, parse_tiny_text_encoder
    from safetensors.torch import load_file

    assert parse_tiny_text_encoder("tiny") == (1.0, 0)
    assert parse_tiny_text_encoder("tiny-positional:3") == (10.0, 3)
    assert parse_tiny_text_encoder(str(tmp_path)) is None  # a folder
    with pytest.raises(ConfigError, match="unknown tiny text encoder.*tiny-positional"):
        parse_tiny_text_encoder("tiny-positonal")
    with pytest.raises(ConfigError, match="seed after ':' must be a non-negative integer"):
        parse_tiny_text_encoder("tiny:x")

    build_tiny_text_encoder(tmp_path / "plain", **TINY_TEXT)
    build_tiny_text_encoder(tmp_path / "positional", relative_bias_scale=10.0, **TINY_TEXT)
    plain = load_file(str(tmp_path / "plain/text_encoder/model.safetensors"))
    positional = load_file(str(tmp_path / "positional/text_encoder/model.safetensors"))
    tables = [k for k in plain if "relative_attention_bias" in k]
    assert tables and plain.keys() == positional.keys()
    for k in plain:
        assert torch.equal(positional[k], plain[k] * 10.0 if k in tables else plain[k]), k

    # The positional encoder carries which direction goes with which colour: swapping the two
    # directions moves the outputs of the unchanged prefix ("a red blob moving") ~5x further.
    captions = ["a red blob moving left and a blue blob moving up",
                "a red blob moving up and a blue blob moving left"]
    moved = {}
    for spec in ("tiny", "tiny-positional"):
        encoder = load_text_encoder(spec, "cpu", text_len=40, text_dim=64)
        states, _ = encoder.encode(captions)
        prefix = int(encoder.encode(["a red blob moving"])[1][0]) - 1  # its tokens without the end token
        a, b = states[0, :prefix], states[1, :prefix]
        moved[spec] = ((a - b).norm(dim=-1) / a.norm(dim=-1)).mean().item()
    assert moved["tiny-positional"] > 3 * moved["tiny"], moved
