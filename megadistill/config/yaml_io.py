"""YAML reading and writing for configs.

Plain scalars follow the YAML 1.2 core schema rather than PyYAML's YAML 1.1 defaults, because
the 1.1 rules bite in training configs: ``1e-5`` would be a string (no dot), ``yes``/``on``/``no``
booleans, ``010`` octal, ``1:30`` a base-60 integer and ``2024-01-01`` a date. Here:

* bool: ``true``/``false`` (any of the three YAML spellings of case) -- ``yes``/``on`` are strings;
* int: decimal (leading zeros allowed, still decimal), ``0o17``, ``0x1f``;
* float: needs a dot or an exponent (``1e-5``, ``2.``, ``.5``), plus ``.inf``/``.nan``;
* null: ``null``, ``~`` or empty; no implicit timestamps.

Duplicate keys in one mapping are an error (PyYAML silently keeps the last one).
The dumper uses the same rules, so written configs read back unchanged.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Dict, Tuple

import yaml

_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_DROPPED = {_BOOL, _INT, _FLOAT, _TIMESTAMP}

_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?[0-9]+[eE][-+]?[0-9]+"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def _core_schema_resolvers(base) -> dict:
    kept = {ch: [(tag, rx) for tag, rx in rules if tag not in _DROPPED]
            for ch, rules in base.yaml_implicit_resolvers.items()}
    for tag, rx, first in ((_BOOL, _BOOL_RE, "tTfF"), (_INT, _INT_RE, "-+0123456789"),
                           (_FLOAT, _FLOAT_RE, "-+0123456789.")):
        for ch in first:
            kept.setdefault(ch, []).append((tag, rx))
    return kept


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars and duplicate-key detection."""

    yaml_implicit_resolvers = _core_schema_resolvers(yaml.SafeLoader)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        if digits.startswith("0o"):
            return sign * int(digits[2:], 8)
        if digits.startswith("0x"):
            return sign * int(digits[2:], 16)
        return sign * int(digits, 10)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable key: the base class reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_constructor(_INT, ConfigLoader.construct_yaml_int)


class ConfigDumper(yaml.SafeDumper):
    """SafeDumper that quotes exactly the strings ConfigLoader would read as non-strings."""

    yaml_implicit_resolvers = ConfigLoader.yaml_implicit_resolvers


def describe_yaml_error(err: yaml.YAMLError) -> Tuple[str, str]:
    """``(position, problem)`` of a PyYAML error, position as ``line L, column C`` (1-based)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    if context and "duplicate" not in problem:
        problem = f"{problem} ({context})"
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return where, problem


def load_yaml_text(text: str) -> Tuple[Any, Dict[str, int]]:
    """Parse one YAML document; return the data and ``{dotted key path: line}`` of every key.

    Raises ``yaml.YAMLError`` (with marks) for bad YAML, including several documents.
    """
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    lines: Dict[str, int] = {}
    if node is not None:
        _record_lines(node, "", lines)
    return data, lines


def parse_scalar(text: str) -> Any:
    """Parse an override value (``1e-5``, ``[0.0, 0.999]``, ``null``, ``true``, ``{a: 1}``)."""
    return yaml.load(text, Loader=ConfigLoader)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=ConfigDumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, fsync, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".yaml", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _record_lines(node, prefix: str, lines: Dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            path = f"{prefix}.{key_node.value}" if prefix else key_node.value
            lines[path] = key_node.start_mark.line + 1
            _record_lines(value_node, path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            lines[path] = item.start_mark.line + 1
            _record_lines(item, path, lines)
