"""Keep secrets out of what obdask writes: logs, records, events, artifacts and the CLI.

Two kinds of secret are replaced by ``***``:

* **known values**: environment variables named like secrets (``*_KEY``,
  ``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``, ``*PASSWD*``, ``*CREDENTIAL*``,
  ``AWS_*`` but the region), the values of ``obdask.storage-options`` under
  such names (``key``, ``secret``, ``token``, ``password``,
  ``aws_secret_access_key``...), and the password of any URL with one in
  ``obdask.storage-options``, ``obdask.llm.endpoints``, ``OLLAMA_HOST`` or the
  store URLs;
* **patterns**: ``password=...``, ``token=...``, ``secret=...``,
  ``api_key=...`` (also with ``:`` and quotes), ``Authorization: Bearer ...``
  / ``Basic ...`` and ``scheme://user:password@host``.

:func:`redact` does a string, :func:`redact_bytes` bytes (command output
before it is stored), :func:`redact_obj` a record (dicts, lists, strings).
:func:`install` adds a log-record factory that redacts every record of the
``obdask`` loggers (child loggers included, created before or after), once per
process.  Values shorter than :data:`MIN_LENGTH` characters are not treated as
secrets (replacing ``yes`` everywhere would hide more than it protects).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import dask

__all__ = ["MASK", "install", "redact", "redact_all", "redact_bytes", "redact_obj",
           "secret_values"]

MASK = "***"
MIN_LENGTH = 8  # a shorter value could match inside ids, digests and timestamps
# searched, not fullmatched: a leading .* made it backtrack on every variable name
_SECRET_NAME = re.compile(r"_KEY|KEY_ID|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|^AWS_|_PAT$|"
                          r"^APIKEY$", re.IGNORECASE)
_NOT_SECRET = re.compile(r"AWS_(DEFAULT_)?REGION|AWS_PROFILE|.*_AUTH_TYPE|.*KEYRING.*|"
                         r".*_KEY_(FILE|PATH)|.*TOKEN_(FILE|PATH)", re.IGNORECASE)
_OPTION_NAME = re.compile(r"(.*_)?(key|secret|token|password|passwd|credentials?|"
                          r"access_key_id|secret_access_key|session_token|client_secret|"
                          r"api_key|sas_token|account_key)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<secret>[^@\s/]+)"
                           r"(?P<tail>@)")
_ASSIGNED = re.compile(
    r"(?P<head>(?<![A-Za-z0-9])[\"']?(?:[A-Za-z0-9_-]*(?:password|passwd|secret|token|"
    r"api[_-]?key|access[_-]?key|private[_-]?key))[\"']?\s*[=:]\s*[\"']?)(?P<secret>[^\s\"'&,;]+)",
    re.IGNORECASE)
_AUTH_HEADER = re.compile(r"(?P<head>\b(?:Authorization|Proxy-Authorization)\s*[:=]\s*"
                          r"(?:Bearer|Basic|Token|Digest)?\s*)(?P<secret>[^\s\"',;]+)",
                          re.IGNORECASE)
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<secret>[A-Za-z0-9._~+/=-]{6,})")
_PATTERNS = (_URL_PASSWORD, _AUTH_HEADER, _BEARER, _ASSIGNED)
# Words one of the four above needs: a string without any skips them (most strings).
_TRIGGER_WORDS = ("pass", "secret", "token", "key", "auth", "bearer")
_TTL = 1.0  # seconds the environment's secrets are reused unless variables came or went

_lock = threading.Lock()
_cache: tuple[Any, tuple[str, ...], re.Pattern[str] | None] | None = None
_env_cache: tuple[float, int, dict[str, str]] = (0.0, -1, {})


def _env_secrets(environ: Mapping[str, str]) -> list[str]:
    return [v for k, v in environ.items()
            if _SECRET_NAME.search(k) and not _NOT_SECRET.fullmatch(k)]


def _option_secrets(value: Any, name: str = "") -> Iterable[str]:
    """Secret-looking values in nested storage options / endpoint config."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _option_secrets(v, str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _option_secrets(v, name)
    elif isinstance(value, str):
        if name and _OPTION_NAME.fullmatch(name):
            yield value
        for m in _URL_PASSWORD.finditer(value):
            yield m["secret"]


def _config_sources() -> Any:
    return (dask.config.get("obdask.storage-options", default=None),
            dask.config.get("obdask.llm.endpoints", default=None),
            dask.config.get("obdask.store", default=None))


def secret_values() -> tuple[str, ...]:
    """The known secret values of this process, longest first."""
    return _compiled()[0]


def _secret_env() -> dict[str, str]:
    """Secret-named variables (and OLLAMA_HOST), re-read when variables come or go, else
    at most once a second: reading the whole environment per record is too slow."""
    global _env_cache
    now = time.monotonic()
    at, size, env = _env_cache
    if size == len(os.environ) and now - at < _TTL:
        return env
    env = {k: v for k, v in os.environ.items() if _SECRET_NAME.search(k)}
    if os.environ.get("OLLAMA_HOST"):
        env["OLLAMA_HOST"] = os.environ["OLLAMA_HOST"]
    _env_cache = (now, len(os.environ), env)
    return env


def _compiled() -> tuple[tuple[str, ...], re.Pattern[str] | None]:
    global _cache
    env = _secret_env()
    sources = _config_sources()
    cached = _cache
    # compared by value with copies taken when compiled (a repr of the sources per
    # call cost more than the redaction of a whole record)
    if cached is not None and cached[0][0] == env and cached[0][1] == sources:
        return cached[1], cached[2]
    stamp = (dict(env), copy.deepcopy(sources))
    values = set(_env_secrets({k: v for k, v in env.items() if k != "OLLAMA_HOST"}))
    values.update(_option_secrets(list(sources)))
    values.update(m["secret"] for m in _URL_PASSWORD.finditer(env.get("OLLAMA_HOST", "")))
    found = tuple(sorted((v for v in values if len(v) >= MIN_LENGTH), key=len, reverse=True))
    pattern = re.compile("|".join(map(re.escape, found))) if found else None
    with _lock:
        _cache = (stamp, found, pattern)
    return found, pattern


def _may_match(text: str) -> bool:
    """Whether any of :data:`_PATTERNS` could match ``text`` (never False when one does).

    Substring tests of the lower-cased text: a case-insensitive regex alternation
    of the same words took 14 us for a 90-character record here, this under 1 us.
    """
    low = text.lower()
    return any(word in low for word in _TRIGGER_WORDS) or ("://" in text and "@" in text)


def redact(text: str, _known: re.Pattern[str] | None | bool = False) -> str:
    """``text`` with every known secret value and secret-looking assignment masked."""
    if not text:
        return text
    known = _compiled()[1] if _known is False else _known
    return _redact_str(text, known if isinstance(known, re.Pattern) else None)


def _redact_str(text: str, known: re.Pattern[str] | None) -> str:
    """:func:`redact` with the known values already looked up (records: per field)."""
    if known is not None:
        text = known.sub(MASK, text)
    if _may_match(text):
        for pattern in _PATTERNS:
            text = pattern.sub(_masked, text)
    return text


def _masked(m: re.Match[str]) -> str:
    return m["head"] + MASK + (m.groupdict().get("tail") or "")


def redact_bytes(data: bytes) -> bytes:
    """:func:`redact` for command output (decoded as UTF-8, undecodable bytes kept)."""
    if not data:
        return data
    text = data.decode("utf-8", "surrogateescape")
    out = redact(text)
    return data if out == text else out.encode("utf-8", "surrogateescape")


def redact_obj(value: Any) -> Any:
    """A copy of a record (dicts, lists, tuples, strings) with secrets masked."""
    return _redact_record(value, _compiled()[1])  # the known values are looked up once


def redact_all(values: Iterable[Any]) -> list[Any]:
    """:func:`redact_obj` of each of ``values`` (the known secrets looked up once)."""
    known = _compiled()[1]
    return [_redact_record(v, known) for v in values]


def _redact_record(value: Any, known: re.Pattern[str] | None) -> Any:
    # Most records hold no secret: one search of all their strings together says so
    # (a match in the joined text is a superset of matches in its parts), which is
    # several times cheaper than a search per string; only then is each string done.
    found: list[str] = []
    _strings(value, found)
    text = "\n".join(found)
    if (known is not None and known.search(text)) or _may_match(text):
        return _redact_obj(value, known)
    if type(value) is dict:  # still a copy: callers add fields to what they got
        return dict(value)
    if type(value) is list:
        return list(value)
    return value


def _strings(value: Any, out: list[str]) -> None:
    # every string _redact_obj would mask, subclasses and named tuples included
    kind = type(value)
    if kind is str:
        out.append(value)
    elif value is None or kind is int or kind is float or kind is bool:
        return
    elif kind is dict or isinstance(value, Mapping):
        for item in value.values():
            _strings(item, out)
    elif kind is list or kind is tuple or isinstance(value, (list, tuple)):
        for item in value:
            _strings(item, out)
    elif isinstance(value, str):
        out.append(str(value))


# Exact types that never hold a secret: most fields of a record, passed without a call.
_SCALARS = frozenset({type(None), int, float, bool})


def _redact_obj(value: Any, known: re.Pattern[str] | None) -> Any:
    kind = type(value)
    if kind is dict:  # a record: its scalars skip the call, its strings skip redact()'s checks
        return {k: v if type(v) in _SCALARS else
                _redact_str(v, known) if type(v) is str else _redact_obj(v, known)
                for k, v in value.items()}
    if kind in _SCALARS or isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        return _redact_str(value, known)
    if isinstance(value, Mapping):
        return {k: _redact_obj(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_obj(v, known) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact_obj(v, known) for v in value)
    return value


class _Factory:
    """Log-record factory: records of ``obdask.*`` loggers get their message redacted."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        if record.name == "obdask" or record.name.startswith("obdask."):
            try:
                message = record.getMessage()
            except Exception:  # a bad format string: let logging report it as usual
                return record
            record.msg, record.args = redact(message), None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record


def install() -> None:
    """Redact every log record of the ``obdask`` loggers in this process (idempotent)."""
    with _lock:
        current = logging.getLogRecordFactory()
        if not isinstance(current, _Factory):
            logging.setLogRecordFactory(_Factory(current))
