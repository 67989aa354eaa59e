"""Load obdask's defaults into ``dask.config`` under the ``obdask`` key.

Same pattern as ``distributed/config.py`` and ``dask_jobqueue/config.py``:
the YAML shipped in the package is registered as defaults, so user config
files and ``DASK_OBDASK__...`` environment variables override it.  Nothing
is written to the user's home directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import dask
import yaml

from obdask.exceptions import ConfigError

logger = logging.getLogger(__name__)

DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "obdask.yaml")
SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "obdask-schema.yaml")

with open(DEFAULTS_FILE) as _f:
    defaults: dict[str, Any] = yaml.safe_load(_f)


def _non_mappings(tree: Mapping[str, Any], prefix: str = "obdask") -> dict[str, Any]:
    """User values (files, ``DASK_OBDASK__...``) that are not mappings where defaults are.

    ``dask.config.update_defaults`` silently replaces such a value with the
    default mapping, so it is noted here, before that, for :func:`check`.
    """
    found: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            continue
        path = f"{prefix}.{key}"
        current = dask.config.get(path, default=None)
        if current is not None and not isinstance(current, Mapping):
            found[path.split(".", 1)[1]] = current
        elif isinstance(current, Mapping):
            found.update(_non_mappings(value, path))
    return found


_replaced_by_defaults = _non_mappings(defaults["obdask"])
dask.config.update_defaults(defaults)


def get(key: str, value: Any = None) -> Any:
    """Return ``value`` if it is not None, else ``obdask.<key>`` from config."""
    if value is not None:
        return value
    return dask.config.get(f"obdask.{key}")


def storage_options(url: str, per_protocol: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``url``'s protocol from ``obdask.storage-options``.

    ``per_protocol`` replaces the config value (e.g. a snapshot shipped to workers).
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    table = get("storage-options") if per_protocol is None else per_protocol
    _check_storage_options(table)
    return dict((table or {}).get(protocol, {}))


def _check_storage_options(table: Any) -> None:
    if table is None:
        return
    if not isinstance(table, Mapping):
        raise ConfigError(f"obdask.storage-options: {table!r} is not a mapping of protocol -> "
                          "fsspec options (e.g. {s3: {endpoint_url: 'http://...'}})")
    for protocol, options in table.items():
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(f"obdask.storage-options.{protocol}: {options!r} is not a mapping "
                              "of fsspec options")


def get_seconds(key: str, value: Any = None) -> float:
    """Like :func:`get` for a duration (``"90s"``, ``"2m"`` or a number)."""
    raw = get(key, value)
    try:
        return float(dask.utils.parse_timedelta(raw, default="s"))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # dask's own parse errors
        raise ConfigError(f"obdask.{key}: {raw!r} is not a duration (use e.g. '90s')") from exc


def get_bytes(key: str, value: Any = None) -> int:
    """Like :func:`get` for a size (``"1MiB"``, ``"16GB"`` or a number of bytes)."""
    raw = get(key, value)
    try:
        size = int(dask.utils.parse_bytes(raw))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # dask's own parse errors
        raise ConfigError(f"obdask.{key}: {raw!r} is not a size (use e.g. '16GB')") from exc
    if size < 0:
        raise ConfigError(f"obdask.{key}: {raw!r} is a negative size")
    return size


def get_int(key: str, value: Any = None, minimum: int | None = 0) -> int:
    """Like :func:`get` for a whole number, at least ``minimum`` (None: no bound)."""
    raw = get(key, value)
    try:
        if isinstance(raw, bool) or float(raw) != int(raw):
            raise ValueError(raw)
        number = int(raw)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"obdask.{key}: {raw!r} is not a whole number") from exc
    if minimum is not None and number < minimum:
        raise ConfigError(f"obdask.{key}: {number} is below the minimum {minimum}")
    return number


def get_str(key: str, value: Any = None, optional: bool = True) -> str | None:
    """Like :func:`get` for a string (a path, URL or name); None allowed if ``optional``."""
    raw = get(key, value)
    if raw is None and optional:
        return None
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"obdask.{key}: {raw!r} is not a non-empty string")
    return raw


def get_str_list(key: str, value: Any = None) -> tuple[str, ...]:
    """Like :func:`get` for a list of strings (null: empty)."""
    raw = get(key, value)
    if raw is None:
        return ()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)) or not all(
            isinstance(item, str) for item in raw):
        raise ConfigError(f"obdask.{key}: {raw!r} is not a list of strings "
                          "(in YAML: [a, b]; in an environment variable: '[\"a\", \"b\"]')")
    return tuple(raw)


def get_bool(key: str, value: Any = None) -> bool:
    """Like :func:`get` for a boolean (YAML booleans; "true"/"false" strings accepted)."""
    raw = get(key, value)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false", "yes", "no", "1", "0"):
        return raw.lower() in ("true", "yes", "1")
    raise ConfigError(f"obdask.{key}: {raw!r} is not true or false")
