"""Every obdask setting checked at once, before anything runs (:func:`check`).

The whole ``obdask`` section of ``dask.config`` is validated once per run against
``obdask/obdask-schema.yaml`` (JSON Schema, with the formats ``duration``, ``size`` and
``boolean`` checked by dask's own parsers), then the few checks a schema cannot express
(:data:`CHECKS`) run on the keys the schema passed.  Every problem is one line naming
the key path and the cause, e.g. ``obdask.run.retries: -1 is less than the minimum of 0``;
an unknown key is an error with the nearest known key (``did you mean ...``).

:mod:`obdask.config` reads one setting when the code needs it; this module knows the
whole tree.  Apart from :mod:`obdask.config` so that the low-level getters import no
subsystem (the command limits and launchers live in :mod:`obdask.payloads`).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dask
import yaml

from obdask import config
from obdask.exceptions import ConfigError

logger = logging.getLogger(__name__)

#: Words for JSON types in messages (``'zzz' is not a whole number``).
_TYPE_WORDS = {"string": "a string", "integer": "a whole number", "number": "a number",
               "boolean": "true or false", "array": "a list", "object": "a mapping",
               "null": "null"}
_FORMAT_WORDS = {"duration": "a duration (use e.g. '90s')", "size": "a size (use e.g. '16GB')",
                 "boolean": "true or false"}
_BOOL_STRINGS = ("true", "false", "yes", "no", "1", "0")


@functools.cache
def schema() -> dict[str, Any]:
    """The parsed ``obdask-schema.yaml`` (read once per process)."""
    with open(config.SCHEMA_FILE) as f:
        return yaml.safe_load(f)


def _is_duration(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return True  # other types are the "type" keyword's business
    return float(dask.utils.parse_timedelta(value, default="s")) >= 0


def _is_size(value: Any) -> bool:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return True  # other types are the "type" keyword's business
    return int(dask.utils.parse_bytes(value)) >= 0


def _is_boolean(value: Any) -> bool:
    return not isinstance(value, str) or value.lower() in _BOOL_STRINGS


@functools.cache
def _validator() -> Any:
    import jsonschema  # imported on the first check only: a few tens of ms

    formats = jsonschema.FormatChecker(formats=())
    parse_errors = (TypeError, ValueError, KeyError, AttributeError)
    formats.checks("duration", raises=parse_errors)(_is_duration)
    formats.checks("size", raises=parse_errors)(_is_size)
    formats.checks("boolean")(_is_boolean)
    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    return cls(schema(), format_checker=formats)


def _canonical(tree: Any, node: Mapping[str, Any]) -> Any:
    """``tree`` with keys spelt as the schema spells them (``n_workers`` -> ``n-workers``).

    ``DASK_OBDASK__RUN__N_WORKERS`` lands in dask.config as ``n_workers``; dask's own
    lookups accept either spelling, so the check does too.  Only keys of mappings with a
    closed set of names are renamed (storage options keep ``endpoint_url``).
    """
    props = node.get("properties") if isinstance(node, Mapping) else None
    if not isinstance(tree, Mapping) or not props:
        return tree
    out = {}
    for key, value in tree.items():
        name = key if key in props else str(key).replace("_", "-")
        name = name if name in props else key
        out[name] = _canonical(value, props.get(name, {}))
    return out


def _message(error: Any) -> Iterator[tuple[str, str]]:
    """``(key path, one-line message)`` for one jsonschema error."""
    where = ".".join(str(p) for p in error.absolute_path)
    value, kind = error.instance, error.validator
    if kind == "additionalProperties" and error.validator_value is False:
        known = list(error.schema.get("properties", {}))
        for extra in sorted(set(value) - set(known), key=str):
            near = difflib.get_close_matches(str(extra), known, n=1)
            hint = f" (did you mean {where}.{near[0]}?)" if near else \
                f" (known keys: {', '.join(known)})"
            yield f"{where}.{extra}", f"{where}.{extra}: unknown key{hint}"
        return
    if kind == "type":
        types = error.validator_value
        types = [types] if isinstance(types, str) else types
        text = f"{value!r} is not " + " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        if "array" in types and isinstance(value, str):
            text += " (in YAML: [a, b]; in an environment variable: '[\"a\", \"b\"]')"
    elif kind == "format":
        text = f"{value!r} is not {_FORMAT_WORDS.get(error.validator_value, error.validator_value)}"
    elif kind == "enum":
        choices = error.validator_value
        shown = ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool)
                          else str(c) for c in choices)
        text = f"{value!r} is not one of {shown}"
        if any(isinstance(c, bool) for c in choices) and isinstance(value, str) and \
                value.lower() in ("true", "false"):
            text += " (a YAML boolean; in an environment variable write True or False)"
    else:
        text = error.message
    yield where, f"{where}: {text}"


def _tree() -> Any:
    """The ``obdask`` config as the user gave it, keys spelt as in the schema."""
    raw = dask.config.get("obdask", default=None)
    if not isinstance(raw, Mapping):
        return raw  # the schema says what it should be
    tree = dict(raw)
    for key, value in config._replaced_by_defaults.items():  # as the user gave it
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[last] = value
    obdask_schema = schema()["properties"]["obdask"]
    return _canonical(tree, obdask_schema)


def _cmd_limits(key: str) -> Any:
    from obdask.payloads.cmd import check_limits  # no distributed

    return check_limits(config.get(key) or {})


def _judge(key: str) -> Any:
    from obdask.judge import check_settings

    return check_settings()


def _store_url(key: str) -> Any:
    from obdask.stores import protocol_problem  # imports fsspec

    url = config.get(key)
    problem = url and protocol_problem(url)
    if problem:
        raise ConfigError(f"obdask.{key}: {problem}")


def _budgets(key: str) -> Any:
    from obdask.llm.budget.ledger import configured_budgets

    return configured_budgets()


#: The checks a schema cannot express, run after it on keys it passed; each raises
#: ConfigError naming the key.
CHECKS: dict[str, Callable[[str], Any]] = {
    "store.records": _store_url,  # a protocol fsspec knows, its package installed
    "store.artifacts": _store_url,
    "sessions.store": _store_url,
    "cmd.limits": _cmd_limits,  # clamped to this machine's hard limits
    "llm.budgets": _budgets,  # a window of 0, scope rules
    "judge": _judge,  # every obdask.judge.* key, read as the judge does (quorum <= panel)
}


def worker_keys() -> list[str]:
    """Keys each worker reads from its own config (``x-read-on: worker`` in the schema)."""
    found = []

    def walk(node: Mapping[str, Any], path: str) -> None:
        for name, sub in (node.get("properties") or {}).items():
            full = f"{path}.{name}" if path else name
            if sub.get("x-read-on") == "worker":
                found.append(full)
            walk(sub, full)

    walk(schema()["properties"]["obdask"], "")
    return found


#: The last settings checked and their problems: a process that runs many plans with the
#: same settings validates them once (jsonschema takes ~10 ms; this key ~0.1 ms).
_last: tuple[str, list[str]] = ("", [])


def problems() -> list[str]:
    """Every problem of the ``obdask`` settings, one line each (empty: all good)."""
    global _last
    tree = _tree()
    key = json.dumps(tree, sort_keys=True, default=repr)
    if key == _last[0]:
        return list(_last[1])
    found = _problems(tree)
    _last = (key, found)
    return list(found)


def _problems(tree: Any) -> list[str]:
    out: list[tuple[str, str]] = []
    for error in _validator().iter_errors({"obdask": tree}):
        out.extend(_message(error))
    bad = {where for where, _ in out}
    for key, value in config._replaced_by_defaults.items():
        if f"obdask.{key}" not in bad and not any(w.startswith(f"obdask.{key}.") for w in bad):
            # Valid (cmd.sandbox: require) but dask.config put the default mapping in its
            # place when obdask loaded its defaults: it would silently not apply.
            out.append((f"obdask.{key}", f"obdask.{key}: {value!r} from a config file or "
                        "environment variable is replaced by the default mapping when obdask "
                        f"loads; set its keys instead (obdask.{key}.<name>)"))
    bad = {where for where, _ in out}
    for key, reader in CHECKS.items():
        path = f"obdask.{key}"
        if any(w == path or w.startswith(path + ".") or path.startswith(w + ".")
               for w in bad):
            continue  # the schema already named it, a key inside it or around it
        try:
            reader(key)
        except ConfigError as exc:
            text = str(exc)
            out.append((path, text if text.startswith("obdask.") else f"{path}: {text}"))
    return [text for _, text in sorted(out, key=lambda item: item[0])]


def check() -> None:
    """Check every ``obdask.*`` setting at once, before anything runs.

    ``obdask run``, ``obdask validate`` and :func:`obdask.run` call this so that a bad
    value fails with a one-line error naming the key, not when (or if) the code that
    reads it runs.

    Raises
    ------
    ConfigError
        Naming the first bad key and how many more there are; ``.errors`` lists every
        message.
    """
    found = problems()
    if found:
        more = len(found) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        err = ConfigError(found[0] + suffix)
        err.errors = found  # type: ignore[attr-defined]
        raise err
