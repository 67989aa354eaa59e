"""Store-URL errors: a StoreError (an OSError) naming the URL, the setting and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import dask
import pytest

from obdask import settings
from obdask.artifacts import ArtifactStore
from obdask.exceptions import ConfigError, PayloadError, StoreError
from obdask.records import RunStore
from obdask.runlock import RunLock


def test_unknown_protocol_is_a_store_error_naming_url_and_setting():
    with pytest.raises(StoreError) as info:
        RunStore("foo://bucket/records", "plan", "r1")
    message = str(info.value)
    assert "'foo://bucket/records' has an unknown protocol 'foo'" in message
    assert "obdask.store.records" in message
    assert isinstance(info.value, OSError) and not isinstance(info.value, PayloadError)


def test_missing_filesystem_package_is_named():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(StoreError, match=r"artifact store: 'gcs://b/a' needs a package that "
                                         r"is not installed: .*gcsfs.*obdask.store.artifacts"):
        ArtifactStore("gcs://b/a")


def test_unwritable_records_store_fails_at_the_lock_with_the_fix(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    store = RunStore(str(tmp_path / "a-file" / "records"), "plan", "r1")
    with pytest.raises(StoreError, match=r"records store .*a-file/records is not writable "
                                         r"\(NotADirectoryError: .*\); choose a folder"):
        RunLock(store).acquire(0)


def test_unwritable_artifact_store_is_found_before_any_job(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    store = ArtifactStore(str(tmp_path / "a-file" / "art"))
    with pytest.raises(StoreError, match=r"artifact store .*a-file/art is not writable"):
        store.check_writable()
    with pytest.raises(StoreError, match="is not writable"):
        store.put(b"data")
    ArtifactStore(str(tmp_path / "art")).check_writable()  # a good one passes
    assert (tmp_path / "art").is_dir()


def test_unreachable_object_store_says_so():
    pytest.importorskip("s3fs")
    options = {"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    store = RunStore("s3://bucket/records", "plan", "r1", options)
    with pytest.raises(StoreError, match=r"records store s3://bucket/records is unreachable "
                                         r"\(EndpointConnectionError: .*\); check the URL"):
        store.completed_before(["a"])


def test_settings_check_names_a_store_url_with_an_unknown_protocol():
    with dask.config.set({"obdask.store.records": "foo://x", "obdask.sessions.store": "bar://y"}):
        with pytest.raises(ConfigError) as info:
            settings.check()
    assert info.value.errors == [
        "obdask.sessions.store: 'bar://y' has an unknown protocol 'bar' (use a folder, or a "
        "URL such as s3://bucket/path with a protocol fsspec knows)",
        "obdask.store.records: 'foo://x' has an unknown protocol 'foo' (use a folder, or a "
        "URL such as s3://bucket/path with a protocol fsspec knows)"]


def test_cli_run_with_an_unwritable_records_store_is_one_line(tmp_path):
    (tmp_path / "plan.md").write_text("- [ ] id=a lane=1 payload=@cmd:touch ran\n")
    (tmp_path / "a-file").write_text("not a folder")
    env = {**os.environ, "DASK_OBDASK__STORE__RECORDS": str(tmp_path / "a-file" / "rec"),
           "DASK_OBDASK__RUN__N_WORKERS": "1"}
    result = subprocess.run([sys.executable, "-m", "obdask.cli", "run", "plan.md"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: records store ") and "is not writable" in last
    assert "Traceback" not in result.stderr and not (tmp_path / "ran").exists()


def test_reading_a_store_that_does_not_exist_yet_is_not_an_error(tmp_path):
    assert ArtifactStore(str(tmp_path / "new-art")).done_keys(["k"]) == set()
    assert RunStore(str(tmp_path / "new-rec"), "plan", "r1").completed_before(["a"]) == {}
