"""Durations and sizes as plans write them, converted by :mod:`dask.utils`.

A thin wrapper around :func:`dask.utils.parse_timedelta` and
:func:`dask.utils.parse_bytes` (the parsers ``dask.config`` values use) that
adds what plans need on top:

* ASCII only: the number is ``[0-9]*.?[0-9]+`` with an optional exponent;
  ``float()`` alone would also read ``1_0`` and non-ASCII digits such as
  ``١٢``;
* the unit aliases plans have always accepted (``sec``, ``min``, ``hr``...);
* a plain amount keeps its fraction (``GPU:0.5``), where dask rounds to
  whole bytes;
* overflow is ``inf`` (callers bound values), not an ``OverflowError``.
"""

from __future__ import annotations

import math
import re

import dask.utils

__all__ = ["parse_bytes", "parse_duration"]

_NUMBER_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
# Units plans accept that dask.utils.timedelta_sizes lacks.
_TIME_ALIASES = {"sec": "s", "secs": "s", "min": "m", "mins": "m", "hr": "h", "hrs": "h"}


def _split(value: object, what: str) -> tuple[str, str]:
    m = _NUMBER_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"not {what}: {value!r}")
    number, unit = m.groups()
    return ("0" + number if number.startswith(".") else number), unit.lower()


def parse_duration(value: str | float | int) -> float:
    """``"90s"``, ``"2m"``, ``"1.5h"`` or a number of seconds -> seconds.

    Units are those of :func:`dask.utils.parse_timedelta` (``ms``, ``s``,
    ``m``, ``h``, ``d``, ``w`` and their long forms) plus ``sec``, ``min``,
    ``hr``; no unit means seconds.

    Raises
    ------
    ValueError
        If the text is not a non-negative duration in ASCII digits.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    number, unit = _split(value, "a duration")
    try:
        return float(dask.utils.parse_timedelta(number + _TIME_ALIASES.get(unit, unit),
                                                default="seconds"))
    except KeyError as exc:  # dask's unknown-unit error
        raise ValueError(f"not a duration: {value!r} (unknown unit {unit!r})") from exc
    except OverflowError:
        return math.inf


def parse_bytes(value: str | float | int) -> float:
    """``"16GB"``, ``"512MiB"``, ``"0.5"`` or a number -> a number (bytes for sizes).

    Units are those of :func:`dask.utils.parse_bytes` (``kB``, ``MB``,
    ``GB``, ``KiB``, ``MiB``, ``GiB``..., ``k``, ``M``, ``G``; case-insensitive).
    A plain amount is returned as written (``"0.5"`` -> 0.5).

    Raises
    ------
    ValueError
        If the text is not a non-negative amount in ASCII digits.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    number, unit = _split(value, "an amount")
    if not unit:
        return float(number)
    try:
        return float(dask.utils.parse_bytes(number + unit))
    except ValueError as exc:
        raise ValueError(f"not an amount: {value!r} (unknown unit {unit!r})") from exc
    except OverflowError:
        return math.inf
