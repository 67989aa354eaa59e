"""The driver's write-behind: a process's record is written while the orchestrator
chooses the next move, in order, and a failed write surfaces in the driver."""

from __future__ import annotations

import threading

import pytest

from obdask.session.api import Session
from obdask.session.behind import WriteBehind
from obdask.session.store import SessionStore
from tests.session.scripted import FULL


def test_writes_run_in_order_off_the_callers_thread():
    behind = WriteBehind("test")
    done: list[tuple[int, str]] = []
    gate = threading.Event()
    behind.put(lambda: (gate.wait(5), done.append((1, threading.current_thread().name))))
    behind.put(lambda: done.append((2, threading.current_thread().name)))
    assert done == []  # queued, not run in the caller's thread
    gate.set()
    behind.settle()
    assert [n for n, _ in done] == [1, 2]
    assert all(name.startswith("test") for _, name in done)
    behind.close()


def test_a_failed_write_skips_the_later_ones_and_is_raised_once():
    behind = WriteBehind("test")
    done: list[int] = []

    def fail():
        raise OSError("disk full")

    behind.put(lambda: done.append(1))
    behind.put(fail)
    behind.put(lambda: done.append(3))  # never lands after a failed write
    with pytest.raises(OSError, match="disk full"):
        behind.settle()
    assert done == [1]
    behind.put(lambda: done.append(4))
    behind.settle()  # the error was raised once; later writes run again
    assert done == [1, 4]
    behind.close()


def test_a_crash_after_a_written_behind_record_repeats_nothing(cluster, model, tmp_path):
    m, _ = model
    # The driver dies in its writer thread right after process 5's snapshot is written:
    # the crash surfaces at the driver's next durable step; process 5 stays recorded.
    s = Session.start(cluster, "prompt", _crash={"index": 5, "at": "after-record"})
    state = s.wait(timeout=60)
    assert state["state"] == "interrupted", state
    (error,) = [e for e in s.events() if e["kind"] == "driver-error"]
    assert "InjectedCrash" in error["error"] and "after-record" in error["error"]
    store = SessionStore(str(tmp_path / "sessions"))
    assert [snap.index for snap in store.read(s.id).snapshots] == [1, 2, 3, 4, 5]
    assert m.processes() == ["S1P1", "S1P2", "S1P3", "S2P1", "S2P2"]
    final = Session.resume(cluster, s.id).wait(timeout=60)
    assert (final["state"], final["flow_code"]) == ("done", FULL), final
    record = store.read(s.id)
    assert [snap.index for snap in record.snapshots] == list(range(1, 16))
    assert len(m.processes()) == 15 and record.respent == 0  # nothing made twice
