"""Checks for plugin options (`[transports.<name>]` in the config file), shared by the built-in
plugins so every option error reads the same. TypeError for a value of the wrong kind,
ValueError for one out of range; `load_transports` prefixes the plugin's name."""

from __future__ import annotations

import math


def seconds(name: str, value: object) -> float:
    """A positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number of seconds, not {value}")
    return float(value)


def integer(name: str, value: object, minimum: int, unit: str = "") -> int:
    """An integer of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer{unit}, not {value!r}")
    if value < minimum:
        least = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise ValueError(f"{name} {least}, not {value}")
    return value
