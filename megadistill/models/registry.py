"""Model families by name. A family module provides ``build_model(model_cfg, run_cfg, seed)`` and
``build_adapter(run_cfg)``; the builder reaches families only through this table, so adding one
is a new entry, not a new code path."""
from __future__ import annotations

import importlib

from megadistill.config import ConfigError

FAMILIES = {"wan": "megadistill.models.wan.family"}


def get_family(name: str, where: str = "recipe.family"):
    if name not in FAMILIES:
        raise ConfigError("config", where, f"unknown model family {name!r}; available: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
