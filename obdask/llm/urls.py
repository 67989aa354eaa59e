"""Ollama endpoint URLs in one canonical form (``scheme://host:port``).

Its own module so that :mod:`obdask.llm.pool` and :mod:`obdask.llm.auth` (which
endpoints get ``OLLAMA_API_KEY``) both use it without importing each other.
"""

from __future__ import annotations

import re
from functools import lru_cache

from obdask.exceptions import ConfigError

__all__ = ["normalize_url"]

_HOSTPORT_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]*)(:[0-9]{1,5})?$")


@lru_cache(maxsize=4096)  # every model call normalises its endpoint list (hundreds, a fleet)
def normalize_url(host: str) -> str:
    """Turn ``host[:port]`` or a URL into ``scheme://host:port`` like the ollama client does.

    Examples
    --------
    >>> normalize_url("127.0.0.1:5000")
    'http://127.0.0.1:5000'
    >>> normalize_url("gpu1")
    'http://gpu1:11434'
    """
    original = host
    host = str(host).strip().rstrip("/")
    scheme, sep, rest = host.partition("://")
    if not sep:
        scheme, rest = "http", host
    hostport, slash, path = rest.partition("/")
    if scheme not in ("http", "https") or not _HOSTPORT_RE.match(hostport) or \
            re.search(r"\s", host) or "//" in rest:
        raise ConfigError(f"Ollama endpoint {original!r} is not a valid URL; use "
                          "http://HOST:PORT (e.g. http://gpu1:11434) in obdask.llm.endpoints "
                          "or OLLAMA_HOST")
    default_port = {"http": 80, "https": 443}[scheme] if sep else 11434
    if hostport.startswith("["):
        has_port = "]:" in hostport
    else:
        has_port = ":" in hostport
    if not has_port:
        hostport = f"{hostport or '127.0.0.1'}:{default_port}"
    elif hostport.startswith(":"):
        hostport = "127.0.0.1" + hostport
    return f"{scheme}://{hostport}" + (f"/{path}" if slash and path else "")
