"""The watchdog that kills a dead worker's commands (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

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
