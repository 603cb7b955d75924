"""Wan DiT checkpoints in any of three formats, read as native-named tensors and written streaming.

Formats:

* ``native``: Wan's own naming (``blocks.0.self_attn.q.weight``) in a ``.safetensors``/``.pth``
  file or a folder of them (optionally sharded with a ``*.safetensors.index.json``), with an
  optional native ``config.json`` (``_class_name: WanModel``). Wan2.1-T2V-1.3B ships native keys
  in a file called ``diffusion_pytorch_model.safetensors``, so the format is told by key names,
  never by file names.
* ``diffusers``: a ``WanTransformer3DModel`` folder (``config.json`` plus
  ``diffusion_pytorch_model[-0000i-of-0000N].safetensors``), or a pipeline folder holding one in
  ``transformer/``.
* ``megadistill``: the tp/pp sharded folder with ``manifest.json`` (see
  :mod:`megadistill.checkpoint.sharded`).

Without a config file the config is inferred from tensor shapes. Shapes fix every size except the
number of heads; Wan's checkpoints all use head dim 128, so ``num_heads = dim // 128`` unless
given explicitly (``num_heads=`` / ``--num-heads``).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from megadistill.checkpoint import (MANIFEST, CheckpointError, Placement, ShardedSource, ShardedWriter,
                                    SizeShardedWriter, atomic_folder, check_destination, collect_weight_files,
                                    dtype_from_name, dtype_name, nbytes, open_files, tp_slice_bounds,
                                    write_json_atomic)
from megadistill.checkpoint.sources import index_files

from .config import WanConfig
from .keys import (UnknownKeyError, block_index, diffusers_to_native, even_stage_blocks, expected_native_keys,
                   native_to_diffusers, pp_stage_of, tp_split_dim)

FORMATS = ("native", "diffusers", "megadistill")
WEIGHTS_BASE = "diffusion_pytorch_model"  # file name stem of Wan's and diffusers' weights
HEAD_DIM = 128  # every public Wan checkpoint; used to infer num_heads from shapes
MODEL_FAMILY = "wan"


# --- shapes and configs ---------------------------------------------------------------------------

def native_shapes(config: WanConfig) -> dict:
    """``{native name: shape}`` of every tensor of a Wan DiT with ``config``, in model order."""
    D, F = config.dim, config.ffn_dim
    top = {
        "patch_embedding.weight": (D, config.in_dim, *config.patch_size), "patch_embedding.bias": (D,),
        "text_embedding.0.weight": (D, config.text_dim), "text_embedding.2.weight": (D, D),
        "time_embedding.0.weight": (D, config.freq_dim), "time_embedding.2.weight": (D, D),
        "time_projection.1.weight": (6 * D, D), "time_projection.1.bias": (6 * D,),
        "head.head.weight": (config.patch_out, D), "head.head.bias": (config.patch_out,),
        "head.modulation": (1, 2, D),
    }
    out = {}
    for name in expected_native_keys(config.num_layers, config.cross_attn_norm):
        if name in top:
            out[name] = top[name]
        elif name.endswith("modulation"):
            out[name] = (1, 6, D)
        elif ".ffn.0." in name:
            out[name] = (F, D) if name.endswith("weight") else (F,)
        elif ".ffn.2.weight" in name:
            out[name] = (D, F)
        elif name.endswith("weight") and name.split(".")[-2] in ("q", "k", "v", "o"):
            out[name] = (D, D)
        else:  # biases of width dim, q/k RMSNorm and norm3 weights
            out[name] = (D,)
    return out


def random_native_state_dict(config: WanConfig, seed: int = 0, dtype=torch.float32) -> dict:
    """A random ``{native name: tensor}`` state dict with ``config``'s shapes (for tests)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in native_shapes(config).items()}


def infer_config(shapes: Mapping, num_heads: int | None = None) -> WanConfig:
    """The config whose tensors have ``shapes`` (native names). ``num_heads`` defaults to
    ``dim // 128``: Wan's head dim, which shapes alone cannot reveal."""
    need = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
            "blocks.0.ffn.0.weight", "head.head.weight")
    lacking = [n for n in need if n not in shapes]
    if lacking:
        raise CheckpointError(f"cannot infer the Wan config from tensor shapes: missing {lacking}; "
                              "provide a config.json")
    pe = tuple(shapes["patch_embedding.weight"])
    if len(pe) != 5:
        raise CheckpointError(f"patch_embedding.weight has shape {list(pe)}; a Wan Conv3d weight is 5-d")
    dim, patch = pe[0], pe[2:]
    if num_heads is None:
        if dim % HEAD_DIM:
            raise CheckpointError(f"cannot infer num_heads: dim={dim} is not a multiple of Wan's head dim "
                                  f"{HEAD_DIM}; pass num_heads (--num-heads)")
        num_heads = dim // HEAD_DIM
    head_rows = shapes["head.head.weight"][0]
    if head_rows % math.prod(patch):
        raise CheckpointError(f"head.head.weight has {head_rows} rows, not a multiple of patch {list(patch)}")
    try:
        return WanConfig(
            dim=dim, ffn_dim=shapes["blocks.0.ffn.0.weight"][0], num_heads=num_heads,
            num_layers=1 + max(b for b in map(block_index, shapes) if b is not None), in_dim=pe[1],
            out_dim=head_rows // math.prod(patch), text_dim=shapes["text_embedding.0.weight"][1],
            freq_dim=shapes["time_embedding.0.weight"][1], patch_size=patch,
            cross_attn_norm="blocks.0.norm3.weight" in shapes)
    except ValueError as e:
        raise CheckpointError(f"inferred Wan config is invalid: {e}") from None


def read_config_json(path) -> WanConfig | None:
    """A Wan config from a native or diffusers ``config.json``; None if the file describes
    another model (e.g. an unrelated config next to a weight file)."""
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None
    cls = d.get("_class_name")
    try:
        if cls == "WanTransformer3DModel":
            return WanConfig.from_diffusers(d)
        if cls == "WanModel" or (cls is None and "dim" in d and "num_layers" in d):
            return WanConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid Wan config ({e})") from None
    return None


def native_config_dict(config: WanConfig) -> dict:
    # Wan's WanModel takes text_dim as an argument; keep it so non-4096 text widths round-trip.
    return {**config.to_native(), "text_dim": config.text_dim}


def diffusers_config_dict(config: WanConfig) -> dict:
    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = "0.33.0"
    return {**config.to_diffusers(), "_diffusers_version": version}


# --- format detection -------------------------------------------------------------------------------

def _naming(keys, where) -> str:
    """'native' or 'diffusers', by which key map the names follow."""
    native = diffusers = 0
    unknown = []
    for k in keys:
        is_n, is_d = _maps(native_to_diffusers, k), _maps(diffusers_to_native, k)
        native += is_n and not is_d
        diffusers += is_d and not is_n
        if not (is_n or is_d):
            unknown.append(k)
    if native and diffusers:
        raise CheckpointError(f"{where}: mixes Wan native and diffusers key names; not a single checkpoint")
    if native or diffusers:
        return "native" if native else "diffusers"
    raise CheckpointError(f"{where}: unknown checkpoint format: no Wan DiT key names "
                          f"(e.g. {list(keys)[:3]}); expected Wan native, diffusers or megadistill")


def _maps(fn, k) -> bool:
    try:
        fn(k)
        return True
    except UnknownKeyError:
        return False


def _locate(path):
    """``(kind, root, files, index, config_path)`` with kind 'megadistill' or 'weights'."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_file() and (p.parent / MANIFEST).is_file():  # the manifest or one shard of a megadistill folder
        p = p.parent
    if p.is_dir() and (p / MANIFEST).is_file():
        return "megadistill", p, [], None, None
    if p.is_file():
        files, index = ([p], None) if not p.name.endswith(".index.json") else (index_files(p), p)
        folder = p.parent
    else:
        folder = p
        files, index = collect_weight_files(p, WEIGHTS_BASE)
        if not files and (p / "transformer").is_dir():  # diffusers pipeline folder
            folder = p / "transformer"
            files, index = collect_weight_files(folder, WEIGHTS_BASE)
        if not files:
            raise CheckpointError(f"{p}: unknown checkpoint format: no weight files (.safetensors/.pth), "
                                  f"no {MANIFEST}, no transformer/ folder")
    cfg = folder / "config.json"
    return "weights", folder, files, index, (cfg if cfg.is_file() else None)


def detect_format(path) -> str:
    """``'native'``, ``'diffusers'`` or ``'megadistill'``; reads only file headers."""
    kind, _, files, index, _ = _locate(path)
    if kind == "megadistill":
        return "megadistill"
    with open_files(files, index) as src:
        return _naming(src.keys(), path)


# --- reading ------------------------------------------------------------------------------------------

class WanCheckpoint:
    """A Wan DiT checkpoint on disk seen through native names; tensors are read on demand.

    ``load(name, tp_rank, tp_size)`` returns tp rank ``tp_rank``'s slice along
    ``tp_split_dim(name)`` (the whole tensor if it is not split), reading only that slice where the
    format stores tensors contiguously (safetensors; megadistill parts at any saved tp).
    """

    def __init__(self, source, format: str, config: WanConfig, source_names: dict, path, config_source: str):
        self.source = source
        self.format = format
        self.config = config
        self.path = Path(path)
        self.config_source = config_source
        self._src_name = source_names  # native name -> name in the files, model order

    def keys(self) -> list:
        return list(self._src_name)

    def __contains__(self, name) -> bool:
        return name in self._src_name

    def __len__(self) -> int:
        return len(self._src_name)

    def shape(self, name) -> tuple:
        return tuple(self.source.shape(self._lookup(name)))

    def dtype(self, name) -> torch.dtype:
        return self.source.dtype(self._lookup(name))

    def load(self, name, tp_rank: int = 0, tp_size: int = 1, dtype=None) -> torch.Tensor:
        src_name = self._lookup(name)
        d = tp_split_dim(name)
        if tp_size == 1 or d is None:
            if not 0 <= tp_rank < tp_size:
                raise CheckpointError(f"tp_rank={tp_rank} is outside tp_size={tp_size}")
            t = self.source.read(src_name)
        else:
            lo, hi = tp_slice_bounds(self.shape(name)[d], tp_rank, tp_size, name)
            t = self.source.read(src_name, d, lo, hi)
        if dtype is not None:
            t = t.to(dtype_from_name(dtype) if isinstance(dtype, str) else dtype)
        return t

    def nbytes(self) -> int:
        return sum(nbytes(self.shape(n), self.dtype(n)) for n in self._src_name)

    def _lookup(self, name):
        try:
            return self._src_name[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.path}") from None

    def close(self):
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"WanCheckpoint({str(self.path)!r}, format={self.format!r}, {len(self)} tensors)"


def open_wan_checkpoint(path, *, num_heads: int | None = None, config: WanConfig | None = None) -> WanCheckpoint:
    """Opens any Wan DiT checkpoint and checks it against its config.

    The config comes from ``config`` if given, else the manifest / ``config.json``, else tensor
    shapes (num_heads = dim // 128 unless ``num_heads`` is given). Missing keys, unexpected keys
    and shapes that disagree with the config raise :class:`CheckpointError`.
    """
    kind, root, files, index, cfg_path = _locate(path)
    source = ShardedSource(root) if kind == "megadistill" else open_files(files, index)
    try:
        if kind == "megadistill":
            fmt, names = "megadistill", {k: k for k in source.keys()}
            family = source.manifest.get("model_family")
            if family != MODEL_FAMILY:
                raise CheckpointError(f"{root}: manifest model_family is {family!r}, not {MODEL_FAMILY!r}")
        else:
            fmt = _naming(source.keys(), path)
            names, unmapped = _native_names(source.keys(), fmt)
        shapes = {n: tuple(source.shape(s)) for n, s in names.items()}
        if config is not None:
            cfg, how = config, "given config"
        elif kind == "megadistill":
            cfg, how = _config_from_dict(source.manifest.get("config", {}), root / MANIFEST), MANIFEST
        else:
            cfg = read_config_json(cfg_path) if cfg_path else None
            how = str(cfg_path)
            if cfg is None:
                cfg = infer_config(shapes, num_heads)
                how = "tensor shapes" + (f", num_heads={num_heads} given" if num_heads
                                         else f" (num_heads = dim // {HEAD_DIM}, Wan's head dim)")
        if num_heads is not None and cfg.num_heads != num_heads:
            cfg, how = _with_heads(cfg, num_heads), f"{how}, num_heads={num_heads} given"
        _validate(shapes, [] if kind == "megadistill" else unmapped, native_shapes(cfg), f"{path} ({fmt})",
                  _describe(cfg, how))
        in_model_order = {n: names[n] for n in native_shapes(cfg)}
        return WanCheckpoint(source, fmt, cfg, in_model_order, root if kind == "megadistill" else path, how)
    except BaseException:
        source.close()
        raise


def _config_from_dict(d, where) -> WanConfig:
    try:
        return WanConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid Wan config ({e})") from None


def _with_heads(cfg: WanConfig, num_heads: int) -> WanConfig:
    try:
        return cfg.replace(num_heads=num_heads)
    except ValueError as e:
        raise CheckpointError(f"num_heads={num_heads}: {e}") from None


def _native_names(keys, fmt) -> tuple:
    """``({native: source name}, [source names with no native counterpart])``."""
    if fmt == "native":
        return {k: k for k in keys}, []
    names, unmapped = {}, []
    for k in keys:
        try:
            names[diffusers_to_native(k)] = k
        except UnknownKeyError:
            unmapped.append(k)
    return names, unmapped


def _validate(shapes: dict, unmapped: list, expected: dict, where: str, against: str):
    """Raises naming (a few of) the missing, unexpected and wrongly shaped tensors."""
    missing = [n for n in expected if n not in shapes]
    unexpected = [n for n in shapes if n not in expected] + list(unmapped)
    wrong = [f"{n} {list(shapes[n])} (expected {list(s)})" for n, s in expected.items()
             if n in shapes and tuple(shapes[n]) != tuple(s)]
    problems = [f"{len(v)} {what}: {', '.join(v[:4])}{', ...' if len(v) > 4 else ''}"
                for what, v in (("missing", missing), ("unexpected", unexpected), ("with wrong shape", wrong)) if v]
    if problems:
        raise CheckpointError(f"{where} does not match {against}: " + "; ".join(problems))


def _describe(c: WanConfig, source: str) -> str:
    return (f"the Wan config from {source} (dim={c.dim}, ffn_dim={c.ffn_dim}, num_layers={c.num_layers}, "
            f"text_dim={c.text_dim}, in/out_dim={c.in_dim}/{c.out_dim}; fix the config or pass the right one)")


# --- writing ------------------------------------------------------------------------------------------

def save_wan_checkpoint(tensors, dst, *, format: str, config: WanConfig, tp: int = 1, pp: int = 1, dtype=None,
                        role: str = "student", overwrite: bool = False, max_shard_size="5GB",
                        stage_blocks=None, progress: bool = False) -> dict:
    """Writes a Wan DiT checkpoint to folder ``dst`` in ``format``; returns a summary dict.

    ``tensors``: a :class:`WanCheckpoint` (read lazily, tp slices read one at a time), a mapping
    or an iterable of ``(native name, tensor)`` in any order. Memory holds one tensor (plus its
    cast copy) at a time. ``dtype`` casts every tensor (None keeps each tensor's dtype). ``tp``,
    ``pp``, ``role`` and ``stage_blocks`` (default: even split) apply to ``megadistill``;
    ``max_shard_size`` to the single-file-or-sharded ``native``/``diffusers`` layouts.

    The folder is built under a temp name next to ``dst`` and renamed at the end; an existing
    ``dst`` raises FileExistsError unless ``overwrite`` (then it is replaced atomically).
    """
    if format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; choose one of {FORMATS}")
    if format != "megadistill" and (tp, pp) != (1, 1):
        raise CheckpointError(f"tp={tp}, pp={pp} apply only to the megadistill format, not {format!r}")
    check_destination(dst, overwrite)
    cast = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    shapes = native_shapes(config)
    get, planned_dtype, lazy = _normalize_input(tensors, shapes, cast)
    if format == "megadistill":
        try:
            stage_blocks = [tuple(b) for b in (stage_blocks or even_stage_blocks(config.num_layers, pp))]
        except ValueError as e:
            raise CheckpointError(f"{e}; pick pp <= num_layers={config.num_layers}") from None
        _check_layout(config, tp, pp, stage_blocks)
    start = time.time()
    with atomic_folder(dst, overwrite) as tmp:
        bar = _progress_bar(len(shapes), progress, f"writing {format}")
        if format == "megadistill":
            writer = ShardedWriter(tmp, [
                Placement(n, shapes[n], planned_dtype(n), tp_split_dim(n), tuple(pp_stage_of(n, stage_blocks)))
                for n in shapes], tp, pp, header={
                    "role": role, "model_family": MODEL_FAMILY, "config": config.to_dict(),
                    "layout": {"stage_blocks": [list(b) for b in stage_blocks]}})

            def put(n, t):
                if t is not None:
                    return writer.write(n, t)
                parts = tp if tp_split_dim(n) is not None else 1  # lazy input: read one tp part at a time
                for r in range(parts):
                    writer.write_part(n, r, tensors.load(n, r, parts, cast))
        else:
            out_name = native_to_diffusers if format == "diffusers" else (lambda n: n)
            writer = SizeShardedWriter(tmp, WEIGHTS_BASE, [(out_name(n), shapes[n], planned_dtype(n)) for n in shapes],
                                       max_shard_size)
            cfg = diffusers_config_dict(config) if format == "diffusers" else native_config_dict(config)
            write_json_atomic(tmp / "config.json", json.dumps(cfg, indent=2) + "\n")

            def put(n, t):
                writer.write(out_name(n), t if t is not None else tensors.load(n, dtype=cast))
        seen = set()
        for name, tensor in get():
            if name not in shapes:
                raise CheckpointError(f"{name!r} is not a tensor of a Wan DiT with this config")
            if tensor is not None and tuple(tensor.shape) != shapes[name]:
                raise CheckpointError(f"{name}: shape {list(tensor.shape)}, config expects {list(shapes[name])}")
            if name in seen:
                raise CheckpointError(f"{name!r} given twice")
            seen.add(name)
            put(name, tensor)
            bar.update(1)
        bar.close()
        missing = [n for n in shapes if n not in seen]
        if missing:
            raise CheckpointError(f"{len(missing)} tensors missing from the input, e.g. {missing[:4]}")
        writer.close()
        files = sorted(p.name for p in tmp.iterdir())
        total = sum((tmp / f).stat().st_size for f in files)
    dtypes = sorted({dtype_name(planned_dtype(n)) for n in shapes})
    return {"dst": str(Path(dst)), "format": format, "tensors": len(shapes), "files": files, "bytes": total,
            "dtype": "/".join(dtypes), "tp": tp, "pp": pp, "seconds": time.time() - start}


def _normalize_input(tensors, shapes: dict, cast):
    """``(get, planned_dtype, lazy)``: ``get()`` yields (name, tensor-or-None) already cast;
    for a lazy checkpoint it yields None and the writer reads the tensor itself."""
    if isinstance(tensors, WanCheckpoint):
        _validate({n: tensors.shape(n) for n in tensors.keys()}, [], shapes, str(tensors.path), "the target config")
        return (lambda: ((n, None) for n in shapes)), (lambda n: cast or tensors.dtype(n)), True
    if isinstance(tensors, Mapping):
        _validate({n: tuple(t.shape) for n, t in tensors.items()}, [], shapes, "input tensors", "the target config")
        return (lambda: ((n, _cast(tensors[n], cast)) for n in shapes)), \
            (lambda n: cast or tensors[n].dtype), False
    it = iter(tensors)
    first = next(it, None)
    if first is None:
        raise CheckpointError("no tensors given")
    guess = cast or first[1].dtype  # plans shard sizes; each file records the real dtypes

    def get():
        yield first[0], _cast(first[1], cast)
        for n, t in it:
            yield n, _cast(t, cast)
    return get, (lambda n: guess), False


def _cast(t, cast):
    return t if cast is None or t.dtype == cast else t.to(cast)


def _check_layout(config: WanConfig, tp: int, pp: int, stage_blocks):
    if tp < 1 or pp < 1:
        raise CheckpointError(f"tp={tp} and pp={pp} must be >= 1")
    for what, n in (("num_heads", config.num_heads), ("ffn_dim", config.ffn_dim)):
        if n % tp:
            raise CheckpointError(f"tp={tp} does not divide {what}={n}; pick a tp that divides it")
    L = config.num_layers
    contiguous = (len(stage_blocks) == pp and stage_blocks[0][0] == 0 and stage_blocks[-1][1] == L
                  and all(lo < hi for lo, hi in stage_blocks)
                  and all(a[1] == b[0] for a, b in zip(stage_blocks, stage_blocks[1:])))
    if not contiguous:
        raise CheckpointError(f"stage_blocks {stage_blocks} must split blocks 0..{L} into pp={pp} "
                              "non-empty contiguous ranges")


def _progress_bar(total, enabled, desc):
    if not enabled:
        class _Null:
            def update(self, n): pass
            def close(self): pass
        return _Null()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


def convert_wan_checkpoint(src, dst, to: str, tp: int = 1, pp: int = 1, dtype=None, overwrite: bool = False, *,
                           max_shard_size="5GB", num_heads: int | None = None, progress: bool = False) -> dict:
    """Converts any Wan DiT checkpoint at ``src`` to format ``to`` at ``dst`` (streaming, atomic)."""
    if to not in FORMATS:
        raise CheckpointError(f"unknown target format {to!r}; choose one of {FORMATS}")
    check_destination(dst, overwrite)
    with open_wan_checkpoint(src, num_heads=num_heads) as ckpt:
        summary = save_wan_checkpoint(ckpt, dst, format=to, config=ckpt.config, tp=tp, pp=pp, dtype=dtype,
                                      overwrite=overwrite, max_shard_size=max_shard_size, progress=progress)
        summary.update(src=str(src), src_format=ckpt.format, config_source=ckpt.config_source,
                       largest_tensor_bytes=max(nbytes(ckpt.shape(n), ckpt.dtype(n)) for n in ckpt.keys()))
    return summary
