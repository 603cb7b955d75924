"""Load, check and write run configs (schema v2).

``load_config(path, overrides)`` reads one YAML file, applies ``KEY.PATH=VALUE`` overrides,
converts every section into its dataclass (``schema.py``) with strict types, checks the
cross-section rules (roles of the method, paths that must exist, ...) and returns a
``RunConfig`` whose models have ``family``/``trainable`` filled in and absolute paths.
Every problem raises ``ConfigError`` naming the file (and line or override), the dotted key
and what was expected.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from typing import Any, Dict, Iterable, Literal, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError
from .schema import (OPTIONAL_ROLES, REQUIRED_ROLES, ROLE_TRAINABLE, ROLES, SYNTHETIC_WORLD_KEYS, SYNTHETIC_WORLD_SEED,
                     DataConfig, ModelConfig, RunConfig)
from .yaml_io import describe_yaml_error, dump_yaml, load_yaml_text, parse_scalar, write_text_atomic

# Keys that people put in the wrong section, and where they live.
_MOVED = {"training.log_every": "logging.log_every", "training.output_dir": "logging.output_dir",
          "training.resume": "checkpoint.resume", "training.flow_shift": "pipeline_config.flow_shift"}

_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)*$")


# -- public API ------------------------------------------------------------------------------
def load_config(path: Union[str, os.PathLike], overrides: Iterable[str] = ()) -> RunConfig:
    """Read the YAML config at ``path``, apply ``overrides`` (``"training.lr=1e-5"`` ...), check it."""
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(file, None, "config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(file, None, f"cannot read config file ({err.__class__.__name__}: {err})") from None
    try:
        data, lines = load_yaml_text(text)
    except yaml.YAMLError as err:
        position, problem = describe_yaml_error(err)
        where = f"{file}, {position}" if position else file
        raise ConfigError(where, None, f"invalid YAML: {problem}") from None
    return _from_data(data, _Context(file, lines), overrides)


def config_from_dict(data: Dict[str, Any], overrides: Iterable[str] = (),
                     source: str = "<dict>") -> RunConfig:
    """Same checks as :func:`load_config` on an already parsed mapping (``source`` names it in errors)."""
    return _from_data(copy.deepcopy(data), _Context(source, {}), overrides)


def config_to_dict(cfg) -> Any:
    """Plain dict/list/scalar form of a config (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """YAML text of the resolved config; :func:`load_config` reads it back to an equal config."""
    return "# megadistill run config, schema v2 (resolved)\n" + dump_yaml(config_to_dict(cfg))


def save_config(cfg: RunConfig, path: Union[str, os.PathLike]) -> None:
    """Write the resolved config to ``path`` atomically (temp file + rename)."""
    write_text_atomic(os.fspath(path), dump_config(cfg))


def parse_override(text: str, source: str = "<overrides>") -> Tuple[str, Any]:
    """``"a.b.c=VALUE"`` -> ``("a.b.c", value)``, the value parsed as YAML (scalar, list, mapping)."""
    where = f"{source} (override {text!r})"
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(where, None, "bad override syntax; expected KEY.PATH=VALUE, e.g. training.lr=1e-5")
    key, _, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not _OVERRIDE_KEY.match(key):
        raise ConfigError(where, None, f"bad override key {key!r}; expected a dotted key path such as "
                                       "models.teacher.path")
    if not raw:
        raise ConfigError(where, key, "override has no value; write null to set null")
    try:
        return key, parse_scalar(raw)
    except yaml.YAMLError as err:
        _, problem = describe_yaml_error(err)
        raise ConfigError(where, key, f"cannot parse value {raw!r} as YAML: {problem}") from None


# -- context: where a key came from ----------------------------------------------------------
class _Context:
    def __init__(self, file: str, lines: Dict[str, int]):
        self.file, self.lines = file, lines
        self.overrides: Dict[str, str] = {}  # key path -> override text that set it

    def where(self, path: str) -> str:
        for key in sorted(self.overrides, key=len, reverse=True):
            if path == key or path.startswith(key + ".") or path.startswith(key + "["):
                return f"{self.file} (override {self.overrides[key]!r})"
        if path in self.lines:
            return f"{self.file}, line {self.lines[path]}"
        for key, text in self.overrides.items():  # e.g. an unknown section made by an override
            if key.startswith(path + "."):
                return f"{self.file} (override {text!r})"
        probe = path
        while probe:  # the key's own line, else its nearest ancestor's (for missing keys)
            if probe in self.lines:
                return f"{self.file}, line {self.lines[probe]}"
            probe = _parent(probe)
        return self.file

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.where(path), path or None, problem)


def _parent(path: str) -> str:
    """``a.b[2]`` -> ``a.b`` -> ``a`` -> ``""``."""
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""


def _from_data(data: Any, ctx: _Context, overrides: Iterable[str]) -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ctx.error("", f"the config must be a mapping of sections, got {_show(data)}")
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        key, value = parse_override(text, ctx.file)
        _set_path(data, key, value, ctx, text)
        ctx.overrides[key] = text
    cfg = _build(RunConfig, data, "", ctx)
    return _resolve(cfg, ctx)


def _set_path(data: dict, key: str, value: Any, ctx: _Context, text: str) -> None:
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parts[:depth + 1])
            raise ConfigError(f"{ctx.file} (override {text!r})", key,
                              f"cannot set a key inside {prefix}, which is {_show(child)}, not a mapping")
        node = child
    node[parts[-1]] = value


# -- typed conversion ------------------------------------------------------------------------
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls, raw: Any, path: str, ctx: _Context):
    """Convert mapping ``raw`` into dataclass ``cls``: unknown keys, missing keys, types, bounds."""
    if not isinstance(raw, dict):
        raise ctx.error(path, f"got {_show(raw)}, expected a mapping (write {{}} for an empty one)")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in raw:
        if not isinstance(key, str):
            raise ctx.error(path, f"keys must be strings, got {_show(key)}")
        if key not in names:
            raise ctx.error(_join(path, key), _unknown_key_problem(_join(path, key), key, names))
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields:
        key_path = _join(path, f.name)
        if f.name in raw:
            value = _convert(raw[f.name], hints[f.name], key_path, ctx)
            _check_bounds(value, f.metadata, key_path, ctx)
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kind = "section" if not path else "key"
            raise ctx.error(key_path, f"missing required {kind}; expected {_describe(hints[f.name])}")
    return cls(**kwargs)


def _convert(value: Any, tp: Any, path: str, ctx: _Context) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        if value is None:
            raise ctx.error(path, f"got null, expected {_describe(inner)}")
        return _convert(value, inner, path, ctx)
    if value is None:
        empty = " (write {} for an empty one)" if _describe(tp) == "a mapping" else ""
        raise ctx.error(path, f"got null, expected {_describe(tp)}{empty}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, ctx)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        hint = _suggest(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise ctx.error(path, f"got {_show(value)}, expected {_describe(tp)}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_convert(v, args[0], f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_convert(v, a, f"{path}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ctx.error(path, f"keys must be strings, got {_show(k)}")
                out[k] = _convert(v, args[1], _join(path, k), ctx)
            return out
    else:  # pragma: no cover - a schema type this converter does not know
        raise TypeError(f"config schema uses unsupported type {tp!r} at {path}")
    raise ctx.error(path, f"got {_show(value)}, expected {_describe(tp)}")


def _check_bounds(value: Any, meta, path: str, ctx: _Context) -> None:
    if value is None or not meta:
        return
    items = value if isinstance(value, (list, tuple)) else (value,)
    tests = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
             "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for i, v in enumerate(items):
        for name, (ok, sign) in tests.items():
            if name in meta and not ok(v, meta[name]):
                where = f"{path}[{i}]" if isinstance(value, (list, tuple)) else path
                raise ctx.error(where, f"got {v!r}, expected a value {sign} {meta[name]}")


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)][0]
        return f"{_describe(inner)} or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} {_plural(args[0])}"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Any: "any value"}.get(tp, repr(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, "items")


def _show(value: Any) -> str:
    kind = ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "an integer" if isinstance(value, int) else "a number" if isinstance(value, float) else
            "a string" if isinstance(value, str) else "a list" if isinstance(value, (list, tuple)) else
            "a mapping" if isinstance(value, dict) else type(value).__name__)
    if value is None:
        return kind
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({kind})"


def _suggest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _unknown_key_problem(full: str, key: str, valid) -> str:
    if full in _MOVED:
        return f"unknown key {key!r}; it lives at {_MOVED[full]}"
    return f"unknown key {key!r}{_suggest(key, valid)} (valid keys: {', '.join(valid)})"


# -- cross-section rules ---------------------------------------------------------------------
def _resolve(cfg: RunConfig, ctx: _Context) -> RunConfig:
    models = _resolve_models(cfg, ctx)
    cfg = dataclasses.replace(cfg, models=models)
    _check_training(cfg, ctx)
    _check_pipeline(cfg, ctx)
    data = _resolve_data(cfg.data, ctx)
    if cfg.logging.quality_samples:
        if cfg.recipe.method != "dmd2" or data.kind != "synthetic":
            raise ctx.error("logging.quality_samples", "the quality report measures a dmd2 run on synthetic "
                            f"data; this run is {cfg.recipe.method} on {data.kind} data, so set 0")
        if cfg.parallel.pp > 1 or cfg.parallel.tp > 1:
            raise ctx.error("logging.quality_samples", "the report reads the whole student from every data-parallel "
                            "rank; with tp or pp > 1 each rank holds a slice of it, so set 0 and measure the "
                            "checkpoint with tools/bench_quality.py")
        if cfg.logging.quality_samples < 2:
            raise ctx.error("logging.quality_samples", "FD needs at least 2 clips per set; set 0 or >= 2")
    checkpoint = cfg.checkpoint
    if checkpoint.resume not in (None, "auto"):
        checkpoint = dataclasses.replace(
            checkpoint, resume=_existing_path(checkpoint.resume, "checkpoint.resume", ctx,
                                              hint="expected null, auto or an existing checkpoint"))
    _nonempty(cfg.recipe.family, "recipe.family", ctx)
    _nonempty(cfg.logging.output_dir, "logging.output_dir", ctx)
    return dataclasses.replace(cfg, data=data, checkpoint=checkpoint)


def _resolve_models(cfg: RunConfig, ctx: _Context) -> Dict[str, ModelConfig]:
    method = cfg.recipe.method
    required = REQUIRED_ROLES[method]
    allowed = required + OPTIONAL_ROLES.get(method, ())
    for role in cfg.models:
        if role not in ROLES:
            raise ctx.error(f"models.{role}", f"unknown role {role!r}{_suggest(role, ROLES)} "
                                              f"(roles: {', '.join(ROLES)})")
        if role not in allowed:
            raise ctx.error(f"models.{role}", f"method {method} does not use a {role}; "
                                              f"it takes {', '.join(allowed)}")
    for role in required:
        if role not in cfg.models:
            needed = ", ".join(f"models.{r}" for r in required)
            raise ctx.error(f"models.{role}", f"missing; method {method} needs {needed}")
    out = {}
    for role in ROLES:
        if role not in cfg.models:
            continue
        m, key = cfg.models[role], f"models.{role}"
        expected = ROLE_TRAINABLE[role]
        trainable = expected if m.trainable is None else m.trainable
        if trainable != expected:
            what = "trained" if expected else "a frozen reference"
            raise ctx.error(f"{key}.trainable", f"the {role} is {what} in every method; "
                                                f"expected {str(expected).lower()} (or leave it out)")
        if m.path is None and m.preset is None:
            raise ctx.error(key, "has neither path nor preset; set path: to a checkpoint, or preset: to a "
                                 "named model shape (e.g. tiny) for random initialization")
        family = cfg.recipe.family if m.family is None else _nonempty(m.family, f"{key}.family", ctx)
        if m.preset is not None:
            _nonempty(m.preset, f"{key}.preset", ctx)
        path = None if m.path is None else _existing_path(m.path, f"{key}.path", ctx)
        if trainable and not m.zero3_partition:
            raise ctx.error(f"{key}.zero3_partition", f"the {role} is trained, and a ZeRO-3 engine "
                                                      "partitions what it trains; expected true")
        if m.realism_head and role != "critic":
            raise ctx.error(f"{key}.realism_head", f"only the critic carries DMD2's realism classifier; "
                                                   f"remove it from the {role}")
        if m.realism_head and (m.causal or cfg.parallel.tp > 1 or cfg.parallel.sp > 1 or cfg.parallel.pp > 1):
            raise ctx.error(f"{key}.realism_head", "the realism head is implemented for a bidirectional critic "
                                                   "with parallel.tp, sp and pp 1 (data parallel and ZeRO work)")
        out[role] = dataclasses.replace(m, family=family, trainable=trainable, path=path)
    if method == "dmd2" and "critic" in out:
        _check_realism_head(cfg, out["critic"], ctx)
    if method == "self_forcing" and not out["student"].causal:
        raise ctx.error("models.student.causal", "self_forcing trains a block-causal student; expected true")
    return out


def _check_realism_head(cfg: RunConfig, critic, ctx: _Context) -> None:
    """dmd2's GAN term (gan_critic_weight > 0) and the critic's realism head go together."""
    weight = cfg.method_config.get("gan_critic_weight", 0) if isinstance(cfg.method_config, dict) else 0
    gan = isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0
    if gan and not critic.realism_head:
        raise ctx.error("models.critic.realism_head", "method_config.gan_critic_weight > 0 trains the critic's "
                                                      "realism classifier; set models.critic.realism_head: true")
    if critic.realism_head and not gan:
        raise ctx.error("models.critic.realism_head", "is set but method_config.gan_critic_weight is 0, so the "
                                                      "classifier would never train; set both or neither")


def _check_training(cfg: RunConfig, ctx: _Context) -> None:
    t = cfg.training
    trainable = cfg.trainable_roles
    for role in t.optim:
        if role not in trainable:
            raise ctx.error(f"training.optim.{role}",
                            f"no trainable role {role!r}{_suggest(role, trainable)}; per-role optimizer "
                            f"settings exist for {', '.join(trainable)}")
    if t.warmup_steps > t.max_steps:
        raise ctx.error("training.warmup_steps", f"got {t.warmup_steps}, expected at most "
                                                 f"training.max_steps ({t.max_steps})")


def _check_pipeline(cfg: RunConfig, ctx: _Context) -> None:
    p = cfg.pipeline_config
    frames = p.latent_shape[1]
    if any(m.causal for m in cfg.models.values()) and frames % p.num_frame_per_block:
        raise ctx.error("pipeline_config.num_frame_per_block",
                        f"{p.num_frame_per_block} does not divide the {frames} latent frames of "
                        "pipeline_config.latent_shape; a causal model needs whole blocks")
    if p.local_attn_size == 0:
        raise ctx.error("pipeline_config.local_attn_size",
                        "got 0, expected -1 (unlimited) or a window >= 1 frame")
    if p.local_attn_size > 0 and p.sink_size >= p.local_attn_size:
        raise ctx.error("pipeline_config.sink_size",
                        f"got {p.sink_size}, expected fewer sink frames than "
                        f"local_attn_size ({p.local_attn_size})")


def _resolve_data(data: DataConfig, ctx: _Context) -> DataConfig:
    if data.world and data.kind != "synthetic":
        raise ctx.error("data.world", f"only synthetic data has world settings; data.kind is {data.kind}, "
                                      "so leave data.world out")
    if data.kind == "synthetic":
        if data.path is not None:
            raise ctx.error("data.path", "synthetic data takes no path; expected null (or leave it out)")
        unknown = sorted(set(data.world) - set(SYNTHETIC_WORLD_KEYS))
        if unknown:
            raise ctx.error("data.world", f"unknown setting(s) {unknown}; expected some of "
                                          f"{list(SYNTHETIC_WORLD_KEYS)}")
        seed = data.world.get("seed", SYNTHETIC_WORLD_SEED)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ctx.error("data.world.seed", f"got {seed!r}, expected an integer >= 0 (the world's own seed; "
                                               f"{SYNTHETIC_WORLD_SEED} is the shipped tiny teacher's world)")
        return data
    if data.path is None:
        what = ("a text file with one prompt a line" if data.kind == "prompts"
                else "a shard directory, file or pattern")
        raise ctx.error("data.path", f"data.kind {data.kind} needs a path; expected {what}")
    if data.kind == "webdataset" and "{" in data.path:
        # brace pattern such as shards/{00000..00099}.tar: its directory must exist
        full = os.path.abspath(os.path.expanduser(data.path))
        if not os.path.isdir(os.path.dirname(full)):
            raise ctx.error("data.path", f"the directory of shard pattern {data.path!r} does not exist "
                                         f"(looked at {os.path.dirname(full)})")
        return dataclasses.replace(data, path=full)
    path = _existing_path(data.path, "data.path", ctx)
    if data.kind == "prompts" and not os.path.isfile(path):
        raise ctx.error("data.path", f"{data.path!r} is not a file; "
                                     "expected a text file with one prompt a line")
    return dataclasses.replace(data, path=path)


def _existing_path(path: str, key: str, ctx: _Context, hint: Optional[str] = None) -> str:
    _nonempty(path, key, ctx)
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        tail = f"; {hint}" if hint else ""
        raise ctx.error(key, f"path {path!r} does not exist (looked at {full}){tail}")
    return full


def _nonempty(value: str, key: str, ctx: _Context) -> str:
    if not value.strip():
        raise ctx.error(key, "got an empty string, expected a non-empty value")
    return value
