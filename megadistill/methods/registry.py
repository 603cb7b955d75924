"""Methods by name: ``@register_method("dmd2")`` on a class, ``build_method("dmd2", ...)`` to make one."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from megadistill.config import ConfigError

_METHODS: Dict[str, type] = {}


def register_method(name: str):
    """Class decorator: make a :class:`TrainingMethod` subclass buildable under ``name``."""

    def wrap(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered to {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def available_methods() -> tuple:
    return tuple(sorted(_METHODS))


def get_method_class(name: str) -> type:
    if name not in _METHODS:
        raise ConfigError("recipe", "recipe.method",
                          f"unknown method {name!r}; available: {list(available_methods())}")
    return _METHODS[name]


def build_method(name: str, bundle, adapter, method_config: Optional[Mapping[str, Any]] = None, **kwargs):
    """Instantiate method ``name`` over ``bundle`` and ``adapter``; ``method_config`` is checked
    by the method (unknown keys are errors). ``kwargs`` go to the constructor (e.g. ``seed``)."""
    return get_method_class(name)(bundle, adapter, method_config, **kwargs)
