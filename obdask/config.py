"""Load obdask's defaults into ``dask.config`` under the ``obdask`` key.

Same pattern as ``distributed/config.py`` and ``dask_jobqueue/config.py``:
the YAML shipped in the package is registered as defaults, so user config
files and ``DASK_OBDASK__...`` environment variables override it.  Nothing
is written to the user's home directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
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


def _one_of(*choices: Any) -> Callable[[str], Any]:
    def check(key: str) -> Any:
        raw = get(key)
        if raw not in choices:
            shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
            hint = ""
            if any(isinstance(c, bool) for c in choices) and isinstance(raw, str) and \
                    raw.lower() in ("true", "false"):
                hint = " (a YAML boolean; in an environment variable write True or False)"
            raise ConfigError(f"obdask.{key}: {raw!r} is not one of {shown}{hint}")
        return raw
    return check


def _optional(getter: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda key: None if get(key) is None else getter(key)


def _mapping(key: str) -> Any:
    raw = get(key)
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"obdask.{key}: {raw!r} is not a mapping")
    return raw


def _budgets(key: str) -> Any:
    raw = get(key)
    if raw is not None and not isinstance(raw, (list, tuple)):
        raise ConfigError(f"obdask.{key}: {raw!r} is not a list of budgets")
    return raw


def _models(key: str) -> Any:
    """``placement.models``: role -> ``{model, gpu, vram}`` (or just a model name)."""
    raw = get(key)
    if raw is None:
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"obdask.{key}: {raw!r} is not a mapping of role -> "
                          "{model, gpu, vram} (e.g. {coder: {model: 'qwen2.5-coder:14b', "
                          "gpu: 1, vram: 10GB}})")
    for role, spec in raw.items():
        where = f"{key}.{role}"
        if isinstance(spec, str) and spec:
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(f"obdask.{where}: {spec!r} is not a mapping {{model, gpu, vram}}")
        if not isinstance(spec.get("model"), str) or not spec["model"]:
            raise ConfigError(f"obdask.{where}.model: {spec.get('model')!r} is not a "
                              "non-empty string (an Ollama model name)")
        gpu = spec.get("gpu") or 0
        try:
            ok = not isinstance(gpu, bool) and float(gpu) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"obdask.{where}.gpu: {gpu!r} is not a number >= 0")
        get_bytes(f"{where}.vram", spec.get("vram") or 0)
    return raw


def _cmd_limits(key: str) -> Any:
    from obdask.payloads.cmd import check_limits  # no distributed

    raw = get(key) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"obdask.{key}: {raw!r} is not a mapping of limits")
    check_limits(raw)
    return raw


def _launcher(key: str) -> Any:
    from obdask.payloads.launch import LAUNCHERS

    return _one_of(*LAUNCHERS)(key)


def _at_least(minimum: int) -> Callable[[str], int]:
    return lambda key: get_int(key, minimum=minimum)


#: How :func:`check` reads each setting (the getter raises ConfigError naming the key).
#: Keys read only on workers in their own way (``placement.lanes``, ``llm.slots``,
#: ``llm.local-endpoint``) are checked where they are read.
CHECKS: dict[str, Callable[[str], Any]] = {
    "workspace": get_str,
    "storage-options": lambda key: _check_storage_options(get(key)),
    "plan.max-bytes": get_bytes,
    "store.artifacts": get_str,
    "store.records": get_str,
    "store.stage-files": _one_of("auto", True, False),
    "run.retries": get_int,
    "run.timeout": get_seconds,
    "run.n-workers": _at_least(1),
    "run.threads-per-worker": _at_least(1),
    "run.connect-timeout": get_seconds,
    "run.wait-for-resources": get_seconds,
    "run.busy-plan-wait": get_seconds,
    "run.worker-ttl": get_seconds,
    "run.git-timeout": get_seconds,
    "run.apply-timeout": get_seconds,
    "cmd.allowlist": get_str_list,
    "cmd.allow-substitution": get_bool,
    "cmd.env-allowlist": get_str_list,
    "cmd.shell": lambda key: get_str(key, optional=False),
    "cmd.max-output": get_bytes,
    "cmd.limits": _cmd_limits,
    "cmd.pdeathsig": get_bool,
    "cmd.launcher": _launcher,
    "placement.models": _models,
    "placement.default-role": get_str,
    "placement.locality": get_bool,
    "placement.file-locality": get_bool,
    "placement.detect": get_bool,
    "placement.max-lanes": _at_least(1),
    "placement.model-poll-interval": get_seconds,
    "placement.max-locality-records": _at_least(1),
    "llm.endpoints": get_str_list,
    "llm.timeout": get_seconds,
    "llm.model-slots": _mapping,
    "llm.slot-timeout": _optional(get_seconds),
    "llm.attempts": _at_least(1),
    "llm.backoff": get_seconds,
    "llm.backoff-max": get_seconds,
    "llm.cool-off": get_seconds,
    "llm.tags-ttl": get_seconds,
    "llm.schema-retries": get_int,
    "llm.num-predict": _at_least(1),
    "llm.budgets": _budgets,
    "llm.system-prompts": _mapping,
    "llm.on-exhausted": _one_of("wait", "fail"),
    "llm.budget-timeout": get_seconds,
}


def check() -> None:
    """Check every ``obdask.*`` setting at once, before anything runs.

    ``obdask run`` and ``obdask validate`` call this so that a bad value
    fails with a one-line error naming the key, not when (or if) the code that
    reads it runs.

    Raises
    ------
    ConfigError
        Naming the first bad key and how many more there are; ``.errors``
        lists every message.
    """
    problems = []
    for key, value in _replaced_by_defaults.items():
        what = CHECKS.get(key)
        try:
            if what is None:
                raise ConfigError(f"obdask.{key}: {value!r} is not a mapping")
            with dask.config.set({f"obdask.{key}": value}):  # the value as the user gave it
                what(key)
        except ConfigError as exc:
            problems.append(str(exc))
    for key, reader in CHECKS.items():
        if key in _replaced_by_defaults:
            continue
        try:
            reader(key)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        more = len(problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        err = ConfigError(problems[0] + suffix)
        err.errors = problems  # type: ignore[attr-defined]
        raise err
