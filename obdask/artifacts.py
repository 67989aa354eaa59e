"""Content-addressed artifact store on any fsspec filesystem.

Layout under the store URL::

    by-hash/<sha1>              raw content (stdout, stderr, model replies, diffs)
    by-hash/<dedupe>.result.json the result of a job whose dedupe key is <dedupe>

An artifact stored under a hash marks every job with that dedupe key as
already done (the single-machine tool's rule).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Iterable
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from obdask.exceptions import PayloadError
from obdask.records import load_record, write_atomic
from obdask.stores import open_fs, store_errors

logger = logging.getLogger(__name__)

BY_HASH = "by-hash"


@functools.lru_cache(maxsize=64)
def _open_store(url: str, options: str) -> ArtifactStore:
    return ArtifactStore(url, json.loads(options))


def sha1_bytes(data: bytes) -> str:
    """Hex sha1 of ``data``."""
    return hashlib.sha1(data).hexdigest()


class ArtifactStore:
    """Put and get content by sha1 on an fsspec URL.

    Parameters
    ----------
    url
        Root of the store, e.g. ``/data/obdask``, ``s3://bucket/obdask``, ``memory://a``.
    storage_options
        Passed to :func:`fsspec.core.url_to_fs` (``endpoint_url`` etc.).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = open_fs("artifact", url, self.storage_options)
        self._made: set[str] = set()

    def __reduce__(self):
        # Every task carries the store: unpickle to one cached instance per process.
        return (_open_store, (self.url, json.dumps(self.storage_options, sort_keys=True,
                                                   default=str)))

    def check_writable(self) -> None:
        """On local disk, make the store's folder now and raise StoreError if it cannot be
        written: every job would fail on it otherwise.  Object stores are left to the
        first write (a probe would cost a request, and s3fs may create buckets)."""
        if not self.is_local:
            return
        with store_errors("artifact", self.url, "write"):
            os.makedirs(self.root, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(f"no write permission on {self.root}")

    @property
    def is_local(self) -> bool:
        """True when the store is on this machine's disk."""
        return isinstance(self.fs, LocalFileSystem)

    def _path(self, name: str) -> str:
        self._check(name)
        return posixpath.join(self.root, BY_HASH, name)

    def _check(self, key: str) -> None:
        if "/" in key or "\\" in key or not key.strip("."):
            # Plans validate dedupe keys; this guards API callers: stay inside by-hash/.
            raise PayloadError(f"artifact store {self.url}: {key!r} is not a valid key")

    def _makedirs(self, path: str) -> None:
        folder = posixpath.dirname(path)
        if folder not in self._made:
            self.fs.makedirs(folder, exist_ok=True)
            self._made.add(folder)

    def put(self, data: bytes) -> str:
        """Store ``data`` under its sha1 (once) and return the sha1."""
        digest = sha1_bytes(data)
        path = self._path(digest)
        with store_errors("artifact", self.url, "write"):
            if not self.fs.exists(path):
                self._makedirs(path)
                # whole or nothing: a partial file under the hash would count as present
                write_atomic(self.fs, path, data, local=self.is_local)
        return digest

    def get(self, digest: str) -> bytes:
        """Content stored under ``digest``; verifies it on the way out."""
        try:
            data = self.fs.cat_file(self._path(digest))
        except FileNotFoundError as exc:
            raise PayloadError(f"artifact {digest} not found in {self.url}") from exc
        if sha1_bytes(data) != digest:
            raise PayloadError(f"artifact {digest} in {self.url} is corrupt (sha1 differs)")
        return data

    def exists(self, digest: str) -> bool:
        return self.fs.exists(self._path(digest))

    def put_result(self, dedupe: str, record: dict[str, Any]) -> None:
        """Mark ``dedupe`` as done by storing the job result beside the content."""
        self._check(dedupe)
        path = self._path(f"{dedupe}.result.json")
        with store_errors("artifact", self.url, "write"):
            self._makedirs(path)
            write_atomic(self.fs, path, json.dumps(record, default=str).encode(),
                         local=self.is_local)

    def done_keys(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` already have an artifact (``by-hash/<key>`` or ``<key>.*``)."""
        wanted = set(keys)
        if not wanted:
            return set()
        try:
            with store_errors("artifact", self.url, "read"):
                names = self.fs.ls(posixpath.join(self.root, BY_HASH), detail=False)
        except FileNotFoundError:
            return set()
        present = {posixpath.basename(n.rstrip("/")).split(".", 1)[0] for n in names}
        return wanted & present

    def result(self, dedupe: str) -> dict[str, Any] | None:
        """The stored result for a dedupe key, if a job stored one."""
        path = self._path(f"{dedupe}.result.json")
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return load_record(data, path, note="")
