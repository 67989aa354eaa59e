"""Shared fixtures: a real LocalCluster, a real S3 API server (moto) on loopback."""

from __future__ import annotations

import faulthandler
import logging
import os
import shutil
import subprocess
import sys
import uuid

import dask
import pytest

from obdask.interpreter import guard_current_frames

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")

# Tests run the interpreter by its full path (sys.executable) in @cmd: lines: trust its
# folder as a place executables may be named in (obdask.cmd.executable-dirs), here and
# in the obdask CLIs and workers the tests start.
EXECUTABLE_DIRS = [*dask.config.get("obdask.cmd.executable-dirs"),
                   os.path.dirname(sys.executable)]
dask.config.set({"obdask.cmd.executable-dirs": EXECUTABLE_DIRS})
# The in-process clusters of the tests run Dask's profilers in this process (and the
# timeout's stack dump calls sys._current_frames too): CPython 3.11's deadlock there
# hung a test (obdask.interpreter).  obdask's plugins install the guard in their
# processes; this process may run clusters without them.
guard_current_frames()
os.environ["DASK_OBDASK__CMD__EXECUTABLE_DIRS"] = repr(EXECUTABLE_DIRS)


# A test that outlives its pytest-timeout by this much is stuck where the timeout's
# signal cannot end it (a thread that never lets the main thread run, a teardown that
# waits forever): every thread's stack is written to stderr and the run exits, so a hang
# shows where it is and fails the run at once instead of eating CI's whole time limit.
WATCHDOG_GRACE = float(os.environ.get("OBDASK_TEST_WATCHDOG_GRACE", "300"))
_watchdog_fd: list[int] = []


def pytest_configure(config):
    # Output capture is suspended while plugins configure: this is the real stderr.
    _watchdog_fd.append(os.dup(sys.stderr.fileno()))


def pytest_unconfigure(config):
    if _watchdog_fd:
        os.close(_watchdog_fd.pop())


def _timeout_of(item) -> float:
    """The item's pytest-timeout limit: its marker, else --timeout, else the ini's."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0] or 0)
    value = item.config.getoption("timeout", None)
    if value is None:
        value = item.config.getini("timeout")
    return float(value or 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = _timeout_of(item)
    # pytest's own faulthandler_timeout, when set, owns faulthandler's one timer.
    if limit <= 0 or not _watchdog_fd or float(item.config.getini("faulthandler_timeout") or 0):
        return (yield)
    faulthandler.dump_traceback_later(limit + WATCHDOG_GRACE, exit=True, file=_watchdog_fd[0])
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def cluster_client():
    """A LocalCluster of 2 worker processes (1 thread each) shared by a test module."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=logging.CRITICAL,
                      resources={"GPU": 1, "VRAM": 24e9}) as cluster:
        with Client(cluster) as client:
            yield client


@pytest.fixture
def fresh_llm_state():
    """No endpoint pools and an empty local token ledger, before and after the test."""
    from obdask.llm import budget
    from obdask.llm.pool import reset_pools

    reset_pools()
    budget.reset_local_ledger()
    yield
    reset_pools()
    budget.reset_local_ledger()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on loopback; yields fsspec storage options for s3://."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing",
               "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}
    yield options
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; obdask's config points s3:// at the loopback server meanwhile."""
    import boto3
    import s3fs

    name = f"obdask-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing",
                 ).create_bucket(Bucket=name)
    fs = s3fs.S3FileSystem(**s3_server)
    with dask.config.set({"obdask.storage-options": {"s3": s3_server}}):
        yield name, fs


@pytest.fixture
def quickstart(tmp_path):
    """A private copy of examples/quickstart (runs must not touch the repository)."""
    target = tmp_path / "quickstart"
    shutil.copytree(os.path.join(EXAMPLES, "quickstart"), target,
                    ignore=shutil.ignore_patterns(".obdask", "build"))
    return target


@pytest.fixture
def git_repo(tmp_path):
    """A real git repository with one committed file."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "app.py").write_text("def answer():\n    return 41\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for args in (["init", "-q"], ["add", "app.py"], ["commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env=env)
    return repo
