"""Prompt cleaning, sentencepiece tokenizers, and a tiny random UMT5 text encoder for tests/benchmarks.

Wan tokenizes with the UMT5-XXL sentencepiece (unigram) tokenizer: ids are padded with ``<pad>`` (id 0)
to ``text_len``, ``</s>`` (id 1) closes every prompt, ``<unk>`` is id 2. The tiny tokenizer trained
here keeps that id layout, so code written against it runs unchanged on the real one.
"""
from __future__ import annotations

import html
import io
import itertools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

try:  # Wan fixes mojibake with ftfy before tokenizing; without it such (rare) text is left as is.
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: fix text encoding (ftfy, if installed), unescape HTML twice, collapse
    whitespace runs to one space, strip."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


_SUBJECTS = ["a cat", "a small dog", "an old fisherman", "a young woman", "two children", "a red fox",
             "a white horse", "a silver robot", "a flock of seagulls", "a wooden sailboat", "a black sports car",
             "a ballet dancer", "a giant octopus", "three astronauts", "a hungry bear", "a street musician"]
_ACTIONS = ["walks slowly along", "sprints quickly across", "jumps over", "rests quietly near",
            "looks curiously around", "drives through", "glides above", "spins in circles on",
            "waits patiently beside", "plays happily in", "climbs carefully up", "swims underneath"]
_PLACES = ["the sandy beach at sunset", "a snowy mountain forest", "the busy neon street at midnight",
           "a green meadow full of tulips", "the calm lake under grey clouds", "an abandoned train station",
           "a narrow river valley in autumn", "the desert dunes at noon", "a rainy village square",
           "a bright kitchen in the morning", "the frozen harbor during winter", "a crowded market in Tokyo",
           "an ancient temple covered with moss", "the volcanic island at dawn"]
_STYLES = ["cinematic lighting", "slow motion", "aerial drone view, 4k", "extreme close-up shot",
           "handheld camera, shallow depth of field", "soft warm pastel colors", "high contrast, dramatic shadows",
           "vintage film grain", "photorealistic, ultra detailed", "watercolor painting style",
           "anime illustration", "black and white documentary footage"]


def tiny_corpus() -> list[str]:
    """A fixed corpus of 2688 short video-style prompts (every subject x action x place, styles cycled)."""
    combos = itertools.product(_SUBJECTS, _ACTIONS, _PLACES)
    return [f"{s} {a} {p}, {_STYLES[i % len(_STYLES)]}." for i, (s, a, p) in enumerate(combos)]


def train_sentencepiece(corpus: list[str], vocab_size: int = 128, seed: int = 0) -> bytes:
    """Train a unigram sentencepiece model with T5's special-token layout (<pad>=0, </s>=1, <unk>=2,
    no <s>). Single-threaded with a fixed seed, so the serialized model is the same bytes every run."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=out, vocab_size=vocab_size, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, character_coverage=1.0,
            minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"train_sentencepiece: vocab_size={vocab_size} does not fit the corpus "
                         f"({len(corpus)} sentences): {e}") from e
    return out.getvalue()


def t5_tokenizer_from_sentencepiece(model_proto: bytes):
    """A transformers ``T5Tokenizer`` equal to the sentencepiece model: same pieces, scores and
    normalization; appends ``</s>``; no sentinel ``<extra_id_N>`` tokens."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5Tokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    sp = SentencePieceProcessor(model_proto=model_proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    if [p for p, _ in vocab[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise ValueError(f"sentencepiece model must start with <pad>, </s>, <unk>; got {vocab[:3]}")
    charsmap = proto.normalizer_spec.precompiled_charsmap or None
    return T5Tokenizer(vocab=vocab, extra_ids=0, _spm_precompiled_charsmap=charsmap)


def _init_umt5_(model: torch.nn.Module, seed: int, relative_bias_scale: float = 1.0) -> None:
    """Fill every parameter from one seeded generator, in state-dict order: embeddings N(0,1), norm
    weights 1 + N(0, 0.1) (not all ones, so a mis-mapped norm shows), other matrices N(0, 1/fan_in),
    relative-position tables N(0, 0.5) times ``relative_bias_scale`` (the same draws at every scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied embedding appears once
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * relative_bias_scale * noise)
            elif name == "shared.weight":
                p.copy_(noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)


def tiny_umt5_config(vocab_size: int, d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                     d_ff: int = 64, num_buckets: int = 32):
    """A small ``UMT5Config`` with UMT5-XXL's structure (gated-GELU FFN, per-layer relative bias)."""
    from transformers import UMT5Config

    if d_model % num_heads:
        raise ValueError(f"tiny_umt5_config: d_model={d_model} is not divisible by num_heads={num_heads}")
    return UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=num_buckets,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Give the finished temporary folder ordinary permissions (mkdtemp makes it private) and rename it
    to ``final``, replacing an older copy."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def build_tiny_text_encoder(dir: str | os.PathLike, vocab_size: int = 128, d_model: int = 32, seed: int = 0,
                            corpus: list[str] | None = None, num_layers: int = 2, num_heads: int = 4,
                            d_ff: int = 64, relative_bias_scale: float = 1.0) -> Path:
    """Write a tiny random UMT5 encoder and a trained sentencepiece tokenizer as a diffusers-style folder:

        dir/text_encoder/config.json, model.safetensors
        dir/tokenizer/tokenizer.json, tokenizer_config.json, spiece.model

    ``relative_bias_scale`` multiplies the relative-position bias tables' seeded draws: at 10
    the encoder's outputs depend on word order far more than at 1, which is what lets a text-to-video
    model tell "a red blob moving left and a blue blob moving up" from the same caption with the
    directions swapped (docs/QUALITY.md). The same arguments give byte-identical files. Each
    subfolder is written to a temporary folder inside ``dir`` and renamed into place. Returns ``dir``.
    """
    from safetensors.torch import save_file
    from transformers import UMT5EncoderModel

    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    proto = train_sentencepiece(tiny_corpus() if corpus is None else list(corpus), vocab_size, seed)
    tokenizer = t5_tokenizer_from_sentencepiece(proto)

    config = tiny_umt5_config(len(tokenizer), d_model, num_layers, num_heads, d_ff)
    config.architectures = ["UMT5EncoderModel"]
    model = UMT5EncoderModel(config)
    _init_umt5_(model, seed, relative_bias_scale)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
               if k != "encoder.embed_tokens.weight"}  # tied to shared.weight, stored once

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-text_encoder-", dir=root))
    config.save_pretrained(tmp)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _replace_dir(tmp, root / "text_encoder")

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=root))
    tokenizer.save_pretrained(tmp)
    (tmp / "spiece.model").write_bytes(proto)
    _normalize_json(tmp / "tokenizer_config.json")
    _replace_dir(tmp, root / "tokenizer")
    return root


def _normalize_json(path: Path) -> None:
    """Rewrite a JSON file with sorted keys so its bytes do not depend on dict insertion order."""
    if path.is_file():
        path.write_text(json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True) + "\n")
