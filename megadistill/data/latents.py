"""Precomputed training samples in WebDataset tar shards, read as a sharded, resumable stream.

Shard layout (plain POSIX tar, readable by the ``webdataset`` package). Each sample is three
consecutive members sharing a key (the member name up to its first dot)::

    <key>.latents.safetensors   {"latents": [C, F, H, W]}   VAE latents (``.npy`` also read)
    <key>.text.safetensors      {"text_states": [L, D]}      text-encoder states of the L valid
                                                             tokens only (``.npy`` also read)
    <key>.prompt.txt            the caption, UTF-8
    <key>.ode.safetensors       optional: {"states": [K, C, F, H, W], "timesteps": [K] float64}
                                the states of an ODE trajectory at K kept timesteps whose clean
                                endpoint is the latents (tools/generate_ode_pairs.py); a dataset
                                has it for every sample or for none

Shards are ``shard-000000.tar``, ``shard-000001.tar``, ...; each is written under a hidden temp
name and renamed when complete. Decoding uses safetensors or ``numpy.load(allow_pickle=False)``:
nothing is unpickled.

Order (all of it a function of ``seed``, so every rank agrees without communication):

* Shard assignment. With ``S`` shards and ``W`` data-parallel ranks, ``S >= W``: rank ``r`` reads
  shards ``i`` with ``i % W == r``. ``S < W``: every rank reads every shard and takes the samples
  at positions ``p`` (counted over the epoch's read order) with ``p % W == r``.
* Epoch ``e`` reads the rank's shards in a permutation drawn from ``(seed, e[, r])``; samples
  within a shard keep their tar order.
* ``shuffle_buffer = K > 1``: the stream is cut into consecutive windows of ``K`` of this rank's
  samples and each window is permuted by a generator of ``(seed, e, r, window index)``. (A window
  shuffle, not WebDataset's reservoir: a position is then ``(epoch, window start, offset in
  window)`` and resuming re-reads at most ``K`` samples.)

A shard that cannot be read (missing, not a tar, truncated) ends where it breaks and counts in
``skipped_shards``; a sample that is incomplete, undecodable, non-finite or shaped unlike the
others counts in ``skipped_samples``; both log a warning and the stream goes on. An epoch in which
this rank finds no readable sample at all raises (the data cannot feed the run).
"""
from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch

from .synthetic import mix_seed

log = logging.getLogger(__name__)

SHARD_NAME = "shard-{:06d}.tar"
_SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
LATENTS_KEY, TEXT_KEY = "latents", "text_states"
ODE_STATES_KEY, ODE_TIMESTEPS_KEY = "states", "timesteps"
_PART_EXTS = {"latents": ("latents.safetensors", "latents.npy"), "text": ("text.safetensors", "text.npy"),
              "prompt": ("prompt.txt",)}
STATE_VERSION = 1


# --- writing ----------------------------------------------------------------------------------------

def _tensor_bytes(name: str, t: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({name: t.detach().cpu().contiguous()})


def _check_sample(i: int, sample: dict) -> tuple:
    for k in ("latents", "text_states", "prompt"):
        if k not in sample:
            raise ValueError(f"sample {i} lacks {k!r}; a sample is a dict with latents [C,F,H,W], "
                             "text_states [L,D] (valid tokens only) and prompt (str)")
    lat, txt, prompt = sample["latents"], sample["text_states"], sample["prompt"]
    if not torch.is_tensor(lat) or lat.ndim != 4 or not lat.is_floating_point():
        raise ValueError(f"sample {i}: latents must be a float tensor [C, F, H, W], got "
                         f"{getattr(lat, 'shape', type(lat).__name__)}")
    if not torch.is_tensor(txt) or txt.ndim != 2 or not txt.is_floating_point():
        raise ValueError(f"sample {i}: text_states must be a float tensor [L, D] of the valid tokens, got "
                         f"{getattr(txt, 'shape', type(txt).__name__)}")
    if not isinstance(prompt, str):
        raise ValueError(f"sample {i}: prompt must be a str, got {type(prompt).__name__}")
    return tuple(lat.shape), txt.shape[1], _check_ode(i, sample, lat)


def _check_ode(i: int, sample: dict, lat: torch.Tensor):
    """Number of ODE states of the sample (None without them)."""
    states, ts = sample.get("ode_states"), sample.get("ode_timesteps")
    if states is None and ts is None:
        return None
    if not (torch.is_tensor(states) and torch.is_tensor(ts) and states.is_floating_point() and ts.ndim == 1
            and states.ndim == 5 and tuple(states.shape[1:]) == tuple(lat.shape) and ts.shape[0] == states.shape[0]):
        raise ValueError(f"sample {i}: ode_states must be a float tensor [K, C, F, H, W] matching the latents "
                         f"{list(lat.shape)} and ode_timesteps a [K] tensor, got "
                         f"{list(getattr(states, 'shape', []))} and {list(getattr(ts, 'shape', []))}")
    return int(states.shape[0])


def _add_member(tf: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards for identical samples
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def _ode_bytes(sample: dict) -> bytes:
    from safetensors.torch import save

    return save({ODE_STATES_KEY: sample["ode_states"].detach().cpu().contiguous(),
                 ODE_TIMESTEPS_KEY: sample["ode_timesteps"].detach().cpu().to(torch.float64).contiguous()})


def _write_shard(final: Path, samples: List[tuple]):
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for key, sample in samples:
                    _add_member(tf, f"{key}.latents.safetensors", _tensor_bytes(LATENTS_KEY, sample["latents"]))
                    _add_member(tf, f"{key}.text.safetensors", _tensor_bytes(TEXT_KEY, sample["text_states"]))
                    _add_member(tf, f"{key}.prompt.txt", sample["prompt"].encode("utf-8"))
                    if sample.get("ode_states") is not None:
                        _add_member(tf, f"{key}.ode.safetensors", _ode_bytes(sample))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_latent_shards(samples_iter: Iterable[dict], out_dir, samples_per_shard: int = 64,
                        overwrite: bool = False) -> List[Path]:
    """Writes ``samples_iter`` (dicts with ``latents [C,F,H,W]``, ``text_states [L,D]``, ``prompt``
    and optionally ``key``, ``ode_states [K,C,F,H,W]`` + ``ode_timesteps [K]``) into
    ``out_dir/shard-000000.tar``, ... and returns the shard paths.

    Every sample must share the latent shape and text width of the first. Keys default to the
    sample's running index (``000000042``). ``out_dir`` may not hold shards already unless
    ``overwrite`` (they are then deleted first). Memory holds one shard's samples at a time. A bad
    sample raises and deletes the shards this call wrote (an interrupted run keeps them: each shard
    on disk is complete).
    """
    if int(samples_per_shard) != samples_per_shard or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard!r} must be a positive integer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in out.iterdir() if _SHARD_RE.match(p.name))
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} shards ({old[0].name}, ...); write to an "
                              "empty folder or pass overwrite=True (--overwrite)")
    for p in old:
        p.unlink()
    written = []
    try:
        _write_all(samples_iter, out, int(samples_per_shard), written)
    except Exception:
        for p in written:  # a dataset cut short by bad input must not pass for a complete one
            p.unlink(missing_ok=True)
        raise
    return written


def _write_all(samples_iter, out: Path, samples_per_shard: int, written: list):
    pending, seen, ref = [], set(), None
    for i, sample in enumerate(samples_iter):
        shape = _check_sample(i, sample)
        if ref is None:
            ref = shape
        elif shape != ref:
            raise ValueError(f"sample {i}: latents {list(shape[0])} / text width {shape[1]} / ODE states "
                             f"{shape[2]} differ from the first sample's {list(ref[0])} / {ref[1]} / {ref[2]}; "
                             "one dataset holds one shape")
        key = str(sample.get("key", f"{i:09d}"))
        if not key or "." in key or "/" in key or key in seen:
            raise ValueError(f"sample {i}: key {key!r} must be unique and contain no '.' or '/'")
        seen.add(key)
        pending.append((key, sample))
        if len(pending) == samples_per_shard:
            written.append(out / SHARD_NAME.format(len(written)))
            _write_shard(written[-1], pending)
            pending = []
    if pending:
        written.append(out / SHARD_NAME.format(len(written)))
        _write_shard(written[-1], pending)
    if not written:
        raise ValueError("write_latent_shards: no samples given")


# --- shard discovery ----------------------------------------------------------------------------------

def resolve_shards(path_or_pattern) -> List[str]:
    """Shard paths of a folder (its ``*.tar``), a glob (``data/shard-*.tar``), a brace pattern
    (``data/shard-{000000..000009}.tar``), a single tar, or a list of these; sorted per entry."""
    if isinstance(path_or_pattern, (list, tuple)):
        return [s for p in path_or_pattern for s in resolve_shards(p)]
    spec = str(path_or_pattern)
    if "{" in spec:
        from braceexpand import braceexpand

        return [s for p in braceexpand(spec) for s in resolve_shards(p)]
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no shard matches {spec!r}")
        return found
    p = Path(spec)
    if p.is_dir():
        found = sorted(str(q) for q in p.glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"{p} holds no .tar shards (write them with tools/preprocess.py)")
        return found
    if p.suffix == ".tar":
        return [str(p)]  # may be missing: the stream counts it as a skipped shard
    raise FileNotFoundError(f"{spec!r} is neither a folder of .tar shards, a .tar file nor a pattern")


# --- decoding -----------------------------------------------------------------------------------------

class CorruptSample(ValueError):
    pass


def _decode_tensor(name: str, data: bytes, key: str) -> torch.Tensor:
    if name.endswith(".npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        return torch.from_numpy(np.ascontiguousarray(arr))
    from safetensors.torch import load

    tensors = load(data)
    want = LATENTS_KEY if name.startswith("latents") else TEXT_KEY
    if want in tensors:
        return tensors[want]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise CorruptSample(f"{name} holds {sorted(tensors)}, not {want!r}")


def decode_sample(key: str, parts: Dict[str, bytes]) -> dict:
    """Raw members of one sample -> ``{"key", "latents", "text_states", "prompt"}``; raises
    :class:`CorruptSample` naming what is wrong."""
    found = {}
    for part, exts in _PART_EXTS.items():
        names = [e for e in exts if e in parts]
        if not names:
            raise CorruptSample(f"lacks {' or '.join(exts)} (has {sorted(parts)})")
        found[part] = names[0]
    try:
        latents = _decode_tensor(found["latents"], parts[found["latents"]], key)
        text = _decode_tensor(found["text"], parts[found["text"]], key)
        prompt = parts["prompt.txt"].decode("utf-8")
    except CorruptSample:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure makes the sample corrupt
        raise CorruptSample(f"cannot be decoded ({type(e).__name__}: {e})") from None
    if latents.ndim != 4 or not latents.is_floating_point():
        raise CorruptSample(f"latents must be a float [C, F, H, W] tensor, got {latents.dtype} {list(latents.shape)}")
    if text.ndim != 2 or not text.is_floating_point() or text.shape[0] < 1:
        raise CorruptSample(f"text_states must be a float [L>=1, D] tensor, got {text.dtype} {list(text.shape)}")
    if not (bool(torch.isfinite(latents).all()) and bool(torch.isfinite(text).all())):
        raise CorruptSample("holds NaN or Inf values")
    sample = {"key": key, "latents": latents, "text_states": text, "prompt": prompt}
    if "ode.safetensors" in parts:
        sample.update(_decode_ode(parts["ode.safetensors"], latents))
    return sample


def _decode_ode(data: bytes, latents: torch.Tensor) -> dict:
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - any decoding failure makes the sample corrupt
        raise CorruptSample(f"ode.safetensors cannot be decoded ({type(e).__name__}: {e})") from None
    states, ts = tensors.get(ODE_STATES_KEY), tensors.get(ODE_TIMESTEPS_KEY)
    if states is None or ts is None or states.ndim != 5 or tuple(states.shape[1:]) != tuple(latents.shape) \
            or ts.ndim != 1 or ts.shape[0] != states.shape[0]:
        raise CorruptSample(f"ode.safetensors must hold states [K, {', '.join(map(str, latents.shape))}] and "
                            f"timesteps [K], got {sorted(tensors)}")
    if not (bool(torch.isfinite(states).all()) and bool(torch.isfinite(ts).all())):
        raise CorruptSample("ODE states hold NaN or Inf values")
    return {"ode_states": states, "ode_timesteps": ts}


def _split_name(name: str) -> tuple:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return name[: len(name) - len(base)] + key, ext


class ShardReadError(RuntimeError):
    pass


def iter_shard_groups(path: str, skip: int = 0) -> Iterator[tuple]:
    """Yields ``(key, {ext: bytes})`` of each sample of a tar shard in order, after skipping the
    first ``skip`` samples without reading their data. A read failure raises
    :class:`ShardReadError`; a sample cut short by it is dropped."""
    try:
        tf = tarfile.open(path, mode="r:")
    except Exception as e:  # noqa: BLE001 - missing file, not a tar, truncated header
        raise ShardReadError(f"cannot open: {type(e).__name__}: {e}") from None
    with tf:
        key, parts, index = None, {}, 0
        try:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k != key:
                    if key is not None:
                        if index >= skip:
                            yield key, parts
                        index += 1
                    key, parts = k, {}
                if index >= skip:
                    parts[ext] = tf.extractfile(member).read()
            if key is not None and index >= skip:
                yield key, parts
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardReadError(f"{type(e).__name__}: {e}") from None


# --- the stream ---------------------------------------------------------------------------------------

class LatentShardStream:
    """Endless batches ``{"latents" [B,C,F,H,W], "text_states" [B,Lmax,D] zero-padded, "text_lens" [B],
    "prompts" list[str], "keys" list[str]}`` of one data-parallel rank; see the module doc for the
    order. ``state_dict()`` is the exact position (epoch, window start as (shard, sample offset),
    offset in the window) plus the skip counters; ``load_state_dict`` resumes there, so the next
    batches are identical to those the saved stream would have produced."""

    def __init__(self, path_or_pattern, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 0):
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0")
        self.shards = resolve_shards(path_or_pattern)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle_buffer = int(shuffle_buffer)
        self.stride = len(self.shards) < self.world_size  # sample-level striding over every shard
        self.my_shards = (list(self.shards) if self.stride
                          else [s for i, s in enumerate(self.shards) if i % self.world_size == self.rank])
        self.skipped_samples = 0
        self.skipped_shards = 0
        self._latent_shape = None  # [C, F, H, W] and text width every sample must have
        self._text_dim = None
        self.epoch = 0
        self._start = (0, 0, 0)  # window start: (position in the epoch's shard order, sample offset, slot)
        self._window_index = 0
        self._taken = 0
        self._skipped_at_start = (0, 0)
        self._window = None
        self._window_end = None
        self._reader = None  # (generator, cursor of its next item, epoch)

    @property
    def skipped(self) -> int:
        """Samples plus shards skipped so far (see ``skipped_samples`` / ``skipped_shards``)."""
        return self.skipped_samples + self.skipped_shards

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        samples = []
        while len(samples) < self.batch_size:
            if self._window is None:
                self._load_window()
            if self._taken < len(self._window):
                samples.append(self._window[self._taken])
                self._taken += 1
            else:
                self._next_window()
        return collate_samples(samples)

    # -- order --

    def _shard_order(self, epoch: int) -> List[str]:
        key = ("shards", self.seed, epoch) if self.stride else ("shards", self.seed, epoch, self.rank)
        g = torch.Generator().manual_seed(mix_seed(*key))
        return [self.my_shards[i] for i in torch.randperm(len(self.my_shards), generator=g).tolist()]

    def _slots(self, epoch: int, cursor: tuple) -> Iterator[tuple]:
        """``(cursor after the item, key, parts or None)`` for every slot from ``cursor`` to the end of
        the epoch; parts is None for a slot of another rank (stride mode)."""
        order = self._shard_order(epoch)
        pos, offset, slot = cursor
        while pos < len(order):
            path = order[pos]
            try:
                for key, parts in iter_shard_groups(path, skip=offset):
                    mine = not self.stride or slot % self.world_size == self.rank
                    offset, slot = offset + 1, slot + 1
                    yield (pos, offset, slot), f"{path}:{key}", (parts if mine else None)
            except ShardReadError as e:
                self.skipped_shards += 1
                log.warning("skipping the rest of shard %s (after %d samples): %s", path, offset, e)
            pos, offset = pos + 1, 0
            yield (pos, 0, slot), None, None  # shard boundary: lets a reader resume after it

    def _load_window(self):
        """Reads the current window (from ``self._start``) and permutes it."""
        self.skipped_samples, self.skipped_shards = self._skipped_at_start
        size = max(1, self.shuffle_buffer)
        reader = self._reader
        if reader is None or reader[1] != self._start or reader[2] != self.epoch:
            if reader is not None:
                reader[0].close()
            reader = [self._slots(self.epoch, self._start), self._start, self.epoch]
        window, end = [], None
        for cursor, key, parts in reader[0]:
            reader[1] = cursor
            if parts is not None:
                sample = self._decode(key, parts)
                if sample is not None:
                    window.append(sample)
                    if len(window) == size:
                        break
        else:
            end = "epoch"
        self._reader = reader if end is None else None
        if end is not None and not window and self._start == (0, 0, 0):
            raise RuntimeError(f"rank {self.rank}: no readable sample in a whole epoch of {len(self.my_shards)} "
                               f"shards ({self.skipped_shards} shards and {self.skipped_samples} samples "
                               "skipped); check the data path and the shards")
        if self.shuffle_buffer > 1 and len(window) > 1:
            g = torch.Generator().manual_seed(mix_seed("window", self.seed, self.epoch, self.rank,
                                                       self._window_index))
            window = [window[i] for i in torch.randperm(len(window), generator=g).tolist()]
        self._window = window
        self._window_end = "epoch" if end is not None else reader[1]

    def _next_window(self):
        if self._window_end == "epoch":
            self.epoch, self._start, self._window_index = self.epoch + 1, (0, 0, 0), 0
        else:
            self._start, self._window_index = self._window_end, self._window_index + 1
        self._skipped_at_start = (self.skipped_samples, self.skipped_shards)
        self._window, self._window_end, self._taken = None, None, 0

    def _decode(self, key: str, parts: dict) -> Optional[dict]:
        try:
            s = decode_sample(key, parts)
            if self._latent_shape is None:
                self._latent_shape, self._text_dim = list(s["latents"].shape), int(s["text_states"].shape[1])
            if list(s["latents"].shape) != self._latent_shape or s["text_states"].shape[1] != self._text_dim:
                raise CorruptSample(f"latents {list(s['latents'].shape)} / text width {s['text_states'].shape[1]} "
                                    f"differ from the dataset's {self._latent_shape} / {self._text_dim}")
            return s
        except CorruptSample as e:
            self.skipped_samples += 1
            log.warning("skipping sample %s: %s", key, e)
            return None

    # -- resume --

    def _identity(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "shuffle_buffer": self.shuffle_buffer, "num_shards": len(self.shards),
                "shards_digest": hashlib.blake2b("\n".join(os.path.basename(s) for s in self.shards).encode(),
                                                 digest_size=8).hexdigest()}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._identity(), "epoch": self.epoch, "window_start": list(self._start),
                "window_index": self._window_index, "taken": self._taken,
                "skipped_at_window_start": list(self._skipped_at_start),
                "latent_shape": self._latent_shape, "text_dim": self._text_dim}

    def load_state_dict(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}; pass a dict "
                             "from LatentShardStream.state_dict()")
        for key, mine in self._identity().items():
            if state.get(key) != mine:
                raise ValueError(f"stream state has {key}={state.get(key)!r} but this stream has {mine!r}; resume "
                                 "with the data and settings the state was saved with")
        self.epoch = int(state["epoch"])
        self._start = tuple(int(v) for v in state["window_start"])
        self._window_index, self._taken = int(state["window_index"]), int(state["taken"])
        self._skipped_at_start = tuple(int(v) for v in state["skipped_at_window_start"])
        self.skipped_samples, self.skipped_shards = self._skipped_at_start
        self._latent_shape, self._text_dim = state["latent_shape"], state["text_dim"]
        if self._reader is not None:
            self._reader[0].close()
        self._window, self._window_end, self._reader = None, None, None
        if self._taken:  # refill the window now so the skip counters match the saved stream's
            self._load_window()
            if self._taken > len(self._window):
                raise ValueError(f"stream state points at sample {self._taken} of a window of {len(self._window)}: "
                                 "the shards changed since the state was saved")


def collate_samples(samples: List[dict]) -> dict:
    """Stacks latents (and ODE states/timesteps, when the samples have them) and zero-pads text states
    to the longest in the batch."""
    lens = [s["text_states"].shape[0] for s in samples]
    first = samples[0]["text_states"]
    text = first.new_zeros(len(samples), max(lens), first.shape[1])
    for i, s in enumerate(samples):
        text[i, : lens[i]] = s["text_states"]
    batch = {"latents": torch.stack([s["latents"] for s in samples]), "text_states": text,
             "text_lens": torch.tensor(lens, dtype=torch.long), "prompts": [s["prompt"] for s in samples],
             "keys": [s["key"] for s in samples]}
    with_ode = ["ode_states" in s for s in samples]
    if any(with_ode):
        if not all(with_ode):
            raise ValueError("a batch mixes samples with and without ODE states; a dataset has them for every "
                             "sample or for none")
        batch["ode_states"] = torch.stack([s["ode_states"] for s in samples])
        batch["ode_timesteps"] = torch.stack([s["ode_timesteps"] for s in samples])
    return batch

