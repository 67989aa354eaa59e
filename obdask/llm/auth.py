"""Which model endpoints receive ``OLLAMA_API_KEY``, and the one ``ollama.Client`` factory.

The official ``ollama`` client sends ``Authorization: Bearer $OLLAMA_API_KEY``
to whatever host it talks to.  A pool of endpoints (``obdask.llm.endpoints``)
is not one trust domain: a key meant for one server must not go to every
other one, nor in clear text over the network.  So the key goes only to:

* the endpoint named by ``OLLAMA_HOST`` (the variable users set together with
  the key), and
* the endpoints listed in ``obdask.llm.api-key-endpoints``;

every other endpoint gets no ``Authorization`` header.  Sending the key over
plain ``http://`` to a host that is not loopback logs one warning per endpoint
(the key crosses the network readable by anyone on the path).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from functools import lru_cache
from typing import Any

from obdask import config
from obdask.llm.urls import normalize_url

__all__ = ["api_key_for", "ollama_client"]

logger = logging.getLogger(__name__)


def _key_endpoints() -> frozenset[str]:
    urls = list(config.get_str_list("llm.api-key-endpoints") or ())
    if os.environ.get("OLLAMA_HOST"):
        urls.append(os.environ["OLLAMA_HOST"])
    return frozenset(normalize_url(u) for u in urls if u and u.strip())


def api_key_for(url: str) -> str | None:
    """``OLLAMA_API_KEY`` when endpoint ``url`` (normalised) may receive it, else None."""
    key = os.environ.get("OLLAMA_API_KEY")
    if not key or url not in _key_endpoints():
        return None
    if url.startswith("http://") and not _loopback(url):
        _warn_plain_http(url)
    return key


def _loopback(url: str) -> bool:
    host = url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=64)
def _warn_plain_http(url: str) -> None:
    logger.warning("OLLAMA_API_KEY is sent to %s over plain http: anyone on the network "
                   "path can read it; use https:// for that endpoint, or remove it from "
                   "obdask.llm.api-key-endpoints / OLLAMA_HOST", url)


def _strip_authorization(request: Any) -> None:
    """httpx request hook: no endpoint but the ones configured gets a bearer token."""
    request.headers.pop("authorization", None)


def ollama_client(url: str, timeout: Any) -> Any:
    """An ``ollama.Client`` for ``url`` that sends ``OLLAMA_API_KEY`` only where allowed.

    Parameters
    ----------
    url : str
        The normalised endpoint URL.
    timeout : float or httpx.Timeout
        Passed to the client.
    """
    import ollama

    key = api_key_for(url)
    verify = _ssl_context()
    if key is not None:
        return ollama.Client(host=url, timeout=timeout, verify=verify,
                             headers={"Authorization": f"Bearer {key}"})
    # ollama.Client adds the key from the environment by itself: remove it per request
    return ollama.Client(host=url, timeout=timeout, verify=verify,
                         event_hooks={"request": [_strip_authorization]})


def _ssl_context() -> Any:
    """The process's TLS context for model endpoints, built once per CA setting.

    ``httpx.Client()`` builds a fresh context (loading the CA bundle, ~20-60 ms of
    CPU) per client; with one client per thread and endpoint, a worker of 30 threads
    facing 30 endpoints spent a minute of CPU on contexts alone and model-call
    throughput fell as endpoints were added.  A context is safe to share across
    clients and threads.  Keyed on ``SSL_CERT_FILE``/``SSL_CERT_DIR``, which
    httpx reads (``trust_env``), so changing them is still seen.
    """
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    with _context_lock:  # threads starting together build one, not one each
        return _ssl_context_for(*key)


_context_lock = threading.Lock()


@lru_cache(maxsize=8)
def _ssl_context_for(cert_file: str | None, cert_dir: str | None) -> Any:
    import httpx

    return httpx.create_ssl_context(trust_env=True)
