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
