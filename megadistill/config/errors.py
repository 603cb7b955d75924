"""The one exception type of the config layer."""
from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
    """A config file or override is invalid.

    ``str(err)`` is a short human-readable line: ``<where>: <key path>: <what is wrong>``, where
    ``<where>`` names the file (with the line when known, or the override that set the key).
    The parts are kept as attributes for programs: ``where``, ``key``, ``problem``.
    """

    def __init__(self, where: str, key: Optional[str], problem: str):
        self.where, self.key, self.problem = where, key, problem
        parts = [p for p in (where, key, problem) if p]
        super().__init__(": ".join(parts))
