"""Store URLs (run records, artifacts): open them and turn their failures into a StoreError.

The record and artifact stores are any fsspec URL.  What can go wrong with one is the
user's to fix, not a payload's: an unknown protocol or a filesystem package that is not
installed (found when the store is opened, and already by ``obdask validate`` through
:func:`protocol_problem`), a store that cannot be reached, or one that cannot be written.
Each becomes one :class:`~obdask.exceptions.StoreError` naming the URL, the setting that
chose it and what to do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import fsspec

from obdask.exceptions import ObdaskError, StoreError

logger = logging.getLogger(__name__)

#: The setting that chooses each kind of store (named in messages).
SETTINGS = {"records": "obdask.store.records (obdask.run(records=...))",
            "artifact": "obdask.store.artifacts (obdask.run(artifacts=...))"}
#: Packages whose exceptions mean "the store is unreachable or refuses", not an obdask bug
#: (botocore's are not OSErrors).
STORAGE_PACKAGES = ("botocore", "aiobotocore", "s3fs", "fsspec", "gcsfs", "adlfs", "aiohttp")


def protocol_problem(url: str) -> str | None:
    """Why fsspec cannot open ``url``'s protocol here (no I/O); None when it can."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        return (f"{url!r} has an unknown protocol {protocol!r} (use a folder, or a URL such "
                "as s3://bucket/path with a protocol fsspec knows)")
    except ImportError as exc:
        return f"{url!r} needs a package that is not installed: {exc}"
    return None


def open_fs(kind: str, url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs(url)`` for a ``kind`` store; failures as StoreError."""
    problem = protocol_problem(url)
    if problem:
        raise StoreError(f"{kind} store: {problem}; set {SETTINGS.get(kind, 'its URL')}")
    try:
        with store_errors(kind, url, "open"):  # some filesystems connect here (hdfs)
            return fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError, TypeError) as exc:  # e.g. an unknown storage option
        raise StoreError(f"{kind} store {url!r}: {exc} (check obdask.storage-options and "
                         f"{SETTINGS.get(kind, 'its URL')})") from exc


def is_storage_error(exc: BaseException) -> bool:
    """True for an error of the filesystem itself (OS, network, cloud SDK)."""
    if isinstance(exc, ObdaskError):
        return False
    return isinstance(exc, (OSError, TimeoutError)) or \
        type(exc).__module__.split(".", 1)[0] in STORAGE_PACKAGES


def _unreachable(exc: BaseException) -> bool:
    name = type(exc).__name__
    return isinstance(exc, (ConnectionError, TimeoutError)) or "Connect" in name or \
        "Endpoint" in name or "Timeout" in name


@contextlib.contextmanager
def store_errors(kind: str, url: str, doing: str) -> Iterator[None]:
    """Turn a filesystem failure while ``doing`` (``"open"``, ``"read"``, ``"write"``) into
    a StoreError.

    obdask's own errors, anything that is not the filesystem's, and FileNotFoundError
    when reading (an absent file the caller expects) pass through.
    """
    try:
        yield
    except Exception as exc:
        if not is_storage_error(exc) or (doing != "write" and isinstance(exc, FileNotFoundError)):
            raise  # not the store's fault, or a missing file the caller handles
        setting = SETTINGS.get(kind, "its URL")
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else ""  # one line (hdfs lists 90 paths)
        cause = f"{type(exc).__name__}: {first}"
        if _unreachable(exc):
            message = (f"{kind} store {url} is unreachable ({cause}); check the URL, that the "
                       f"service is up, credentials and obdask.storage-options")
        elif doing == "write":
            message = (f"{kind} store {url} is not writable ({cause}); choose a folder or "
                       f"bucket this process may write in {setting}, or fix its permissions")
        else:
            message = (f"{kind} store {url} cannot be {'opened' if doing == 'open' else 'read'}"
                       f" ({cause}); check the URL, credentials and obdask.storage-options")
        raise StoreError(message) from exc
