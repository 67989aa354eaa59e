"""Load obdask's defaults into ``dask.config`` under the ``obdask`` key.

Same pattern as ``distributed/config.py`` and ``dask_jobqueue/config.py``:
the YAML shipped in the package is registered as defaults, so user config
files and ``DASK_OBDASK__...`` environment variables override it.  Nothing
is written to the user's home directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dask
import yaml

from obdask.exceptions import ConfigError

DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "obdask.yaml")
SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "obdask-schema.yaml")

with open(DEFAULTS_FILE) as _f:
    defaults: dict[str, Any] = yaml.safe_load(_f)

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
    return dict((table or {}).get(protocol, {}))


def get_seconds(key: str, value: Any = None) -> float:
    """Like :func:`get` for a duration (``"90s"``, ``"2m"`` or a number)."""
    raw = get(key, value)
    try:
        return float(dask.utils.parse_timedelta(raw, default="s"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"obdask.{key}: {raw!r} is not a duration (use e.g. '90s')") from exc


def get_bytes(key: str, value: Any = None) -> int:
    """Like :func:`get` for a size (``"1MiB"``, ``"16GB"`` or a number of bytes)."""
    raw = get(key, value)
    try:
        return int(dask.utils.parse_bytes(raw))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"obdask.{key}: {raw!r} is not a size (use e.g. '16GB')") from exc
