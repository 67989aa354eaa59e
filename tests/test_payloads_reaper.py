"""The watchdog that kills a dead worker's commands (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import dask
import psutil
import pytest

from obdask.payloads.reaper import Watchdog
from tests.cluster_utils import wait_gone


def test_forgotten_groups_survive_and_a_dead_watchdog_is_replaced():
    dog = Watchdog()
    group = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert dog.watch(group.pid)
        first = dog._proc
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        # The next message finds the pipe broken and starts a new watchdog.
        assert dog.watch(group.pid) and dog._proc.pid != first.pid
        dog.forget(group.pid)
        os.close(dog._fd)  # as if this process died: the watchdog reads EOF
        # forgotten too, or dog.close() at exit closes whatever reuses the number (seen:
        # fsspec's IO thread, "OSError: [Errno 9] Bad file descriptor" at shutdown)
        dog._fd = -1
        dog._proc.wait(timeout=10)
        assert group.poll() is None  # forgotten: left alone
    finally:
        group.kill()
        group.wait()


def test_watched_group_dies_with_its_owner(tmp_path):
    script = (
        "import subprocess, sys, time\n"
        "from obdask.payloads.reaper import watchdog\n"
        "p = subprocess.Popen(['sh', '-c', 'sleep 300 & sleep 300'], start_new_session=True)\n"
        "watchdog.watch(p.pid)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pgid = int(owner.stdout.readline())
    deadline = time.monotonic() + 10
    while not psutil.Process(pgid).children() and time.monotonic() < deadline:
        time.sleep(0.02)
    members = [pgid] + [c.pid for c in psutil.Process(pgid).children()]
    assert len(members) >= 2
    owner.kill()
    owner.wait()
    owner.stdout.close()
    assert all(wait_gone(pid) for pid in members)


def test_the_owner_exits_without_leaving_its_watchdog_unwaited(tmp_path):
    """At exit the watchdog is told (its pipe closed) and waited for: no ``ResourceWarning:
    subprocess N is still running`` from ``Popen.__del__`` at interpreter shutdown."""
    script = (
        "import os\n"
        "from obdask.payloads.cmd import run_command\n"
        "from obdask.payloads.reaper import watchdog\n"
        "assert run_command('true', os.getcwd(), env=dict(os.environ), timeout=30).ok\n"
        "print(watchdog._proc.pid, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c", script],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ResourceWarning" not in done.stderr and "still running" not in done.stderr, \
        done.stderr
    assert wait_gone(int(done.stdout.split()[0]))


def test_close_stops_the_watchdog_and_a_later_watch_starts_a_new_one():
    dog = Watchdog()
    group = subprocess.Popen(["sleep", "30"], start_new_session=True)
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert dog.watch(group.pid)
        first = dog._proc
        dog.close()  # as at exit: a group still registered is killed, the watchdog waited
        assert first.returncode == 0 and dog._proc is None
        assert group.wait(timeout=10) == -signal.SIGKILL
        dog.close()  # idempotent
        assert dog.watch(other.pid) and dog._proc.pid != first.pid
        dog.forget(other.pid)
        dog.close()
        assert other.poll() is None  # forgotten: left alone
    finally:
        for p in (group, other):
            p.kill()
            p.wait()


def _cgroups_here() -> bool:
    from obdask.payloads import cgroup

    return cgroup._parent() is not None


@pytest.mark.skipif(not _cgroups_here(), reason="no writable pids cgroup")
def test_jobs_in_cgroups_send_the_watchdog_no_message(tmp_path, monkeypatch):
    """A job held in its cgroup is covered by the watchdog's sweep of the worker's
    cgroups: no watch/forget message (each wakes the watchdog) per job."""
    from obdask.payloads.cmd import run_command
    from obdask.payloads.reaper import watchdog

    sent: list[bytes] = []
    original = Watchdog._send
    monkeypatch.setattr(Watchdog, "_send", lambda self, line: sent.append(line)
                        or original(self, line))
    with dask.config.set({"obdask.cmd.sandbox.mode": "off"}):
        for _ in range(3):
            assert run_command("true", str(tmp_path), timeout=30).ok
    assert sent == [] and watchdog._root is not None
    with dask.config.set({"obdask.cmd.sandbox.mode": "off", "obdask.cmd.pids-max": None}):
        assert run_command("true", str(tmp_path), timeout=30).ok  # no cgroup: messages
    assert len(sent) == 2, sent


@pytest.mark.skipif(not _cgroups_here(), reason="no writable pids cgroup")
def test_a_job_outside_a_cgroup_first_does_not_cost_later_jobs_their_sweep(tmp_path,
                                                                          monkeypatch):
    """The first job of a worker may have no cgroup (sandboxed, or pids-max null): the
    watchdog it starts still sweeps the cgroups, so later jobs send no message."""
    from obdask.payloads import launch
    from obdask.payloads.cmd import run_command

    fresh = Watchdog()  # as in a new worker: nothing started yet
    monkeypatch.setattr(launch, "watchdog", fresh)
    sent: list[bytes] = []
    original = Watchdog._send
    monkeypatch.setattr(Watchdog, "_send", lambda self, line: sent.append(line)
                        or original(self, line))
    try:
        with dask.config.set({"obdask.cmd.sandbox.mode": "off", "obdask.cmd.pids-max": None}):
            assert run_command("true", str(tmp_path), timeout=30).ok
        assert len(sent) == 2, sent  # no cgroup: watch and forget
        with dask.config.set({"obdask.cmd.sandbox.mode": "off"}):
            for _ in range(3):
                assert run_command("true", str(tmp_path), timeout=30).ok
        assert len(sent) == 2, sent  # in their cgroups: covered by the sweep
    finally:
        fresh.close()


@pytest.mark.skipif(not _cgroups_here(), reason="no writable pids cgroup")
def test_a_setsid_descendant_dies_with_the_worker(tmp_path):
    """The sweep of the worker's job cgroups reaches what left the process group."""
    marker = f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    script = (
        "import dask, sys\n"
        "from obdask.payloads.cmd import run_command\n"
        "dask.config.set({'obdask.cmd.sandbox.mode': 'off'})\n"
        f"run_command('setsid sleep {marker} & echo $$ > pid; sleep 300', sys.argv[1],"
        " timeout=60, allowlist=['setsid', 'sleep', 'echo'])\n"
    )
    owner = psutil.Popen([sys.executable, "-c", script, str(tmp_path)])
    pid_file = tmp_path / "pid"

    def survivors() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and marker in p.info["cmdline"]]

    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip() and survivors()):
            assert time.monotonic() < deadline and owner.poll() is None
            time.sleep(0.05)
        shell = int(pid_file.read_text())
        owner.kill()
        owner.wait()
        assert wait_gone(shell)
        deadline = time.monotonic() + 10
        while survivors() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not survivors()
    finally:
        for p in survivors():
            p.kill()
