"""The guard against CPython 3.11's deadlock in ``sys._current_frames`` (gh-106883):
the deadlock itself, in a subprocess, and the guard where obdask installs it."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from obdask import interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The deadlock's recipe: a collection while sys._current_frames() makes frame objects
# (threshold 1), a GC callback that lets the GIL go (as Dask's GC diagnosis and any
# finalizer can), and threads ending meanwhile.  Without the guard this hung in 3 runs
# out of 3 on CPython 3.11.7 (the sleep stands for any Python code in a callback).
RECIPE = textwrap.dedent('''
    import gc, sys, threading, time
    from obdask.interpreter import guard_current_frames
    guard_current_frames()
    inside = threading.Event()
    def callback(phase, info):
        if inside.is_set() and threading.current_thread() is threading.main_thread():
            time.sleep(0.001)
    gc.callbacks.append(callback)
    stop = False
    def leaf():
        time.sleep(0.0005)
    def busy():
        while not stop:
            leaf()
    for _ in range(8):
        threading.Thread(target=busy, daemon=True).start()
    gc.set_threshold(1)
    end, samples = time.monotonic() + float(sys.argv[1]), 0
    while time.monotonic() < end:
        ending = [threading.Thread(target=leaf) for _ in range(4)]
        for t in ending:
            t.start()
        inside.set()
        sys._current_frames()
        inside.clear()
        for t in ending:
            t.join()
        samples += 1
    stop = True
    print("samples", samples)
''')


def test_frames_are_sampled_while_threads_end_during_a_collection():
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", RECIPE, "4"], env=env, capture_output=True,
                          text=True, timeout=120)  # a deadlock: TimeoutExpired
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) > 10, proc.stdout


def test_the_guard_pauses_the_collector_only_inside_the_call(monkeypatch):
    seen = []
    monkeypatch.setattr(interpreter, "_original", lambda: seen.append(gc.isenabled()) or {})
    assert gc.isenabled()
    interpreter._current_frames()
    assert seen == [False] and gc.isenabled()
    gc.disable()  # a process that turned the collector off keeps it off
    try:
        interpreter._current_frames()
        assert seen == [False, False] and not gc.isenabled()
    finally:
        gc.enable()


def test_the_guard_is_installed_on_cpython_3_11_only():
    assert interpreter.needs_guard((3, 11)) is (sys.implementation.name == "cpython")
    assert not interpreter.needs_guard((3, 12)) and not interpreter.needs_guard((3, 10))
    installed = interpreter.guard_current_frames()
    assert installed is interpreter.needs_guard()
    assert (sys._current_frames is interpreter._current_frames) is installed
    assert interpreter.guard_current_frames() is installed  # idempotent
    if installed:  # still the frames of every thread: this one's holds this test
        frame = sys._current_frames()[threading.get_ident()]
        codes = []
        while frame is not None:
            codes.append(frame.f_code)
            frame = frame.f_back
        assert sys._getframe().f_code in codes


@pytest.mark.skipif(not interpreter.needs_guard(), reason="only CPython 3.11 needs the guard")
def test_obdask_workers_and_scheduler_install_the_guard(cluster_client):
    from obdask.server import install

    install(cluster_client)

    def guarded():
        return sys._current_frames.__module__

    assert set(cluster_client.run(guarded).values()) == {"obdask.interpreter"}
    assert cluster_client.run_on_scheduler(guarded) == "obdask.interpreter"
