"""Every obdask setting checked at once, before anything runs (:func:`check`).

:mod:`obdask.config` reads one setting; this module knows how each ``obdask.*``
key is read (:data:`CHECKS`) and checks them all, so a bad value fails with a
one-line error naming its key instead of when (or if) the code that reads it
runs.  Apart from :mod:`obdask.config` so that the low-level getters import no
subsystem (the command limits and launchers live in :mod:`obdask.payloads`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import dask

from obdask.config import (
    _check_storage_options,
    _replaced_by_defaults,
    get,
    get_bool,
    get_bytes,
    get_int,
    get_seconds,
    get_str,
    get_str_list,
)
from obdask.exceptions import ConfigError

logger = logging.getLogger(__name__)


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
    "security.roots": get_str_list,
    "security.protocols": get_str_list,
    "run.git-timeout": get_seconds,
    "run.apply-timeout": get_seconds,
    "optimize.fuse": get_bool,
    "optimize.batch": get_bool,
    "optimize.batch-size": _at_least(1),
    "optimize.batch-duration": get_seconds,
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
    "judge.panel": lambda key: _judge(),  # every obdask.judge.* key, read as the judge does
}


def _judge() -> Any:
    from obdask.judge import check_settings

    return check_settings()


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
