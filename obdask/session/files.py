"""Low-level file access of the session store: paths, atomic and exclusive writes.

:class:`RecordFiles` is the base of :class:`~obdask.session.store.SessionStore`: it
turns a session id into its folder under the store URL, replaces files atomically where
the filesystem allows (:func:`obdask.records.write_atomic`, as the run records do),
creates files exclusively (``os.link`` of a :func:`~obdask.records.write_temp` file on
local disk, a lock in memory, ``If-None-Match`` on S3) and turns every filesystem error
into a :class:`~obdask.exceptions.SessionError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from obdask.exceptions import SessionError, UnknownSession
from obdask.records import write_atomic, write_temp
from obdask.session.record import ID_RE

logger = logging.getLogger(__name__)

__all__ = ["RecordFiles"]

_MEMORY_LOCK = threading.Lock()


class RecordFiles:
    """Files of session records under an fsspec URL (one folder per session id).

    Parameters
    ----------
    url
        Where records live (``memory://``, a local path, ``s3://``).
    storage_options
        fsspec options for the URL's protocol.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise SessionError(f"session store {url!r}: {exc}") from exc
        self._local = isinstance(self.fs, LocalFileSystem)
        self._memory = isinstance(self.fs, MemoryFileSystem)

    def __reduce__(self):
        return (type(self), (self.url, self.storage_options))

    def __repr__(self) -> str:
        return f"SessionStore({self.url!r})"

    # -- paths and low-level io ----------------------------------------------------------
    def _dir(self, session_id: str) -> str:
        if not isinstance(session_id, str) or not ID_RE.match(session_id):
            raise ValueError(f"session id {session_id!r}: use letters, digits, '.', '_' or "
                             "'-' (at most 128, not starting with a punctuation mark)")
        return posixpath.join(self.root, session_id)

    def _path(self, session_id: str, *parts: str) -> str:
        return posixpath.join(self._dir(session_id), *parts)

    def _where(self, path: str) -> str:
        return f"{self.url.rstrip('/')}/{posixpath.relpath(path, self.root)}"

    def _makedirs(self, path: str) -> None:
        if not self._memory:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)

    def _write(self, path: str, data: bytes, durable: bool = True) -> None:
        """Replace ``path`` atomically where the filesystem allows.

        ``durable=False`` (local disk): no fsync, for mirrors the record can be rebuilt
        without (an fsync costs milliseconds on every transition of every session).
        """
        try:
            self._makedirs(path)
            if self._memory:  # under the lock listings take (fsspec's memory store is a dict)
                with _MEMORY_LOCK:
                    self.fs.pipe_file(path, data)
            else:
                write_atomic(self.fs, path, data, local=self._local, sync=durable)
        except Exception as exc:  # noqa: BLE001  (botocore errors are not OSErrors)
            raise SessionError(f"cannot write {self._where(path)}: {exc}") from exc

    def _create(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if absent (atomically where possible); False if it exists."""
        try:
            self._makedirs(path)
            if self._local:
                tmp = write_temp(path, data, sync=True)
                try:
                    os.link(tmp, path)  # fails if path exists: exclusive and never partial
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
                return True
            if self._memory:
                with _MEMORY_LOCK:
                    if self.fs.exists(path):
                        return False
                    self.fs.pipe_file(path, data)
                return True
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        except Exception as exc:  # noqa: BLE001  (botocore errors are not OSErrors)
            raise SessionError(f"cannot write {self._where(path)}: {exc}") from exc

    def _read_bytes(self, path: str) -> bytes | None:
        try:
            if self._local:
                with open(path, "rb") as f:
                    return f.read()
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001  (botocore errors are not OSErrors)
            raise SessionError(f"cannot read {self._where(path)}: {exc}") from exc

    def _read_json(self, path: str, damaged: list[tuple[str, str]] | None = None) -> Any:
        """Parsed JSON of ``path``; None when absent or damaged (then reported)."""
        data = self._read_bytes(path)
        if data is None:
            return None
        return self._parse(path, data, damaged)

    def _parse(self, path: str, data: bytes, damaged: list[tuple[str, str]] | None) -> Any:
        try:
            return json.loads(data)
        except ValueError as exc:
            why = f"damaged ({exc})"
            logger.warning("session store: skipping %s: %s", self._where(path), why)
            if damaged is not None:
                damaged.append((self._where(path), why))
            return None

    def _ls(self, path: str) -> list[str]:
        try:
            if self._local:
                return sorted(n for n in os.listdir(path) if not n.endswith(".tmp"))
            self.fs.invalidate_cache(path)
            if self._memory:  # fsspec's memory store lists its dict: not while a write adds
                with _MEMORY_LOCK:
                    names = self.fs.ls(path, detail=False)
            else:
                names = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as exc:  # noqa: BLE001  (botocore errors are not OSErrors)
            raise SessionError(f"cannot list {self._where(path)}: {exc}") from exc
        return sorted(posixpath.basename(n.rstrip("/")) for n in names
                      if not n.endswith(".tmp"))

    def _exists(self, session_id: str) -> bool:
        return self._read_bytes(self._path(session_id, "meta.json")) is not None

    def _require(self, session_id: str) -> None:
        if not self._exists(session_id):
            raise UnknownSession(f"no session {session_id!r} in {self.url}")

