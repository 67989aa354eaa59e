"""The content-addressed artifact store on fsspec (local folder and memory://)."""

from __future__ import annotations

import uuid

import pytest

from obdask.artifacts import ArtifactStore, sha1_bytes
from obdask.exceptions import PayloadError


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    url = str(tmp_path / "store") if request.param == "local" else \
        f"memory://obdask-{uuid.uuid4().hex}"
    return ArtifactStore(url)


def test_put_get_by_hash_and_dedupe_marks(store):
    key = store.put(b"hello")
    assert key == sha1_bytes(b"hello") and store.get(key) == b"hello"
    store.put_result("build-v1", {"status": "done"})
    assert store.done_keys([key, "build-v1", "other"]) == {key, "build-v1"}


@pytest.mark.parametrize("key", ["../escape", "a/b", "..", "."])
def test_keys_cannot_leave_the_store(store, key):
    with pytest.raises(PayloadError, match="is not a valid key"):
        store.put_result(key, {"status": "done"})
