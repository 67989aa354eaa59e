"""Parse durations and sizes without importing Dask (plans parse with no cluster)."""

from __future__ import annotations

import re

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_DURATION_RE = re.compile(rf"^\s*{_NUMBER}\s*([a-zA-Z]*)\s*$")
_SECONDS = {"": 1, "ms": 1e-3, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
            "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
            "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400,
            "days": 86400}
_BYTES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_duration(value: str | float | int) -> float:
    """``"90s"``, ``"2m"``, ``"1.5h"`` or a number of seconds -> seconds.

    Raises
    ------
    ValueError
        If the text is not a non-negative duration.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        m = _DURATION_RE.match(str(value))
        if not m or m.group(2).lower() not in _SECONDS:
            raise ValueError(f"not a duration: {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    return number * _SECONDS[unit]


def parse_bytes(value: str | float | int) -> float:
    """``"16GB"``, ``"512MiB"``, ``"1"`` or a number -> a number (bytes for sizes).

    Raises
    ------
    ValueError
        If the text is not a non-negative amount.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m or m.group(2).lower() not in _BYTES:
        raise ValueError(f"not an amount: {value!r}")
    return float(m.group(1)) * _BYTES[m.group(2).lower()]
