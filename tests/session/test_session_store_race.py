"""Two drivers racing for one session on a real store: the fencing contract under threads.

Driver A (epoch 1) keeps appending processes; driver B claims the session with epoch 2 at
a random moment and continues after what it read.  Every trial checks:

* a write of A that returned normally is in the final record (returning normally = durable);
* a write of A that raised ``LeaseLost`` with ``kept=False`` is not (never durable);
* A is told (``LeaseLost``) once B has taken over, and does not go on;
* the final record is one chain 1..N: no process lost or doubled.
"""

from __future__ import annotations

import random
import threading
import uuid

import pytest

from obdask.exceptions import LeaseLost
from obdask.session.model import SessionState
from obdask.session.store import SessionStore


def path_states(n):
    state, out = SessionState(), []
    for _ in range(n):
        state = state.apply(state.default_move())
        out.append(state)
    return out


STATES = path_states(15)  # S1P123S2P123S3P123S4P123S5P123


def driver_a(store, outcome, told):
    """The driver about to be superseded: epoch 1, processes 1..10."""
    for state in STATES[:10]:
        try:
            store.append_process("s", 1, state, {"by": "A"})
        except LeaseLost as exc:
            outcome[state.processes_run] = f"lost-{exc.kept}"
            told.set()
            return
        outcome[state.processes_run] = "ok"


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_two_drivers_race(kind, tmp_path):
    trials = 50 if kind == "memory" else 25
    rng = random.Random(1234)
    for trial in range(trials):
        url = (f"memory://race-{uuid.uuid4().hex[:8]}" if kind == "memory"
               else str(tmp_path / f"t{trial}"))
        store_a, store_b = SessionStore(url), SessionStore(url)
        store_a.create("s", "race", epoch=1)
        outcome: dict[int, str] = {}
        a_told = threading.Event()
        start_b = rng.randint(0, 6)
        thread = threading.Thread(target=driver_a, args=(store_a, outcome, a_told))
        thread.start()
        # B takes over once A has made some progress (or at once).
        while len(outcome) < start_b and thread.is_alive():
            pass
        record = store_b.claim("s", 2)
        for state in STATES[record.next_index - 1:12]:
            store_b.append_process("s", 2, state, {"by": "B"})
        thread.join()

        final = store_b.read("s")
        indexes = [s.index for s in final.snapshots]
        assert indexes == list(range(1, 13)), (trial, indexes, outcome)
        assert final.flow_code == STATES[11].flow_code
        final.check_resumable()
        by = {s.index: s.payload["by"] for s in final.snapshots}
        for index, result in outcome.items():
            if result == "ok":
                assert by[index] == "A", (trial, index, outcome, by)
            elif result == "lost-False":
                assert by[index] == "B", (trial, index, outcome, by)
            elif result == "lost-True":
                assert by[index] == "A", (trial, index, outcome, by)
        # A never advanced past B's takeover without being told.
        if len(outcome) < 10:
            assert a_told.is_set()
        assert all(by[i] == "B" for i in range(record.next_index, 13))
        assert all(by[i] == "A" for i in range(1, record.next_index))
        if kind == "memory":
            store_b.fs.rm(store_b.root, recursive=True)  # one process-wide dict


def test_a_stale_status_write_does_not_overwrite_the_new_drivers(tmp_path):
    """Driver A (epoch 1) passes the fence; B takes over (epoch 2) and records its status
    before A's meta.json write: A's write is refused, B's status stays."""
    url = str(tmp_path / "store")
    store_a, store_b = SessionStore(url), SessionStore(url)
    store_a.create("s", "race", epoch=1)
    original = store_a._fence

    def fence_then_takeover(session_id, epoch, doing):
        original(session_id, epoch, doing)  # A passed the fence...
        store_b.claim(session_id, 2)  # ...then B took the session over
        store_b.update(session_id, 2, status="running", driver="B")

    store_a._fence = fence_then_takeover
    with pytest.raises(LeaseLost) as info:
        store_a.update("s", 1, status="interrupted", driver="A")
    meta = SessionStore(url).read("s")
    assert (meta.status, meta.epoch) == ("running", 2)
    assert info.value.kept is False  # refused, not written and then found out
