"""Crash injection at every boundary of a (store-level) driver loop, then resume.

The loop is the shape a session driver has: claim, then per process begin_call ->
model call -> record_tokens -> append_process.  A crash at any boundary followed by a
resume with a higher epoch gives the same flow code; a recorded call is never made again;
a call cut off before its snapshot is made again once and labelled re-spent.
"""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from obdask.session.model import MoveKind
from obdask.session.store import SessionStore

BOUNDARIES = ("before_call", "after_call", "after_tokens", "after_snapshot")


class Crash(Exception):
    pass


def drive(store, sid, epoch, crashes, calls):
    """Run the session with the default moves; raise Crash at the listed boundaries."""
    record = store.claim(sid, epoch)
    record.check_resumable()
    state = record.state
    while not state.finished:
        move = state.default_move()
        if move.kind is MoveKind.FINISH:
            store.update(sid, epoch, state=state.apply(move))
            return
        nxt = state.apply(move)
        index = nxt.processes_run

        def crash_at(boundary, index=index):
            if (index, boundary) in crashes:
                crashes.discard((index, boundary))
                raise Crash(f"{boundary} of process {index}")

        crash_at("before_call")
        ticket = store.begin_call(sid, epoch, index, nxt.position)
        calls.append(index)  # the model call is made
        crash_at("after_call")
        store.record_tokens(sid, epoch, ticket, model="m", input_tokens=10, output_tokens=1)
        crash_at("after_tokens")
        store.append_process(sid, epoch, nxt, {"output": f"process {index}"})
        crash_at("after_snapshot")
        state = nxt


crash_points = st.sets(st.tuples(st.integers(1, 15), st.sampled_from(BOUNDARIES)), max_size=8)


@settings(max_examples=30, deadline=None)
@given(crash_points)
def test_crash_anywhere_then_resume(crashes):
    expected = "S1P123S2P123S3P123S4P123S5P123"
    store = SessionStore(f"memory://resume-{uuid.uuid4().hex[:8]}")
    store.create("s", "prompt", epoch=1)
    pending = set(crashes)
    cut_off = {(i, b) for i, b in crashes if b in ("after_call", "after_tokens")}
    calls: list[int] = []
    epoch = 1
    for _ in range(len(crashes) + 1):
        try:
            drive(store, "s", epoch, pending, calls)
            break
        except Crash:
            epoch += 1  # a new driver takes over
    record = store.read("s")
    assert record.state.finished and record.flow_code == expected
    assert [s.index for s in record.snapshots] == list(range(1, 16))
    # Every process's call is made once, plus once more for each call cut off.
    assert sorted(calls) == sorted(list(range(1, 16)) + [i for i, _ in cut_off])
    assert record.respent == len(cut_off)
    # Token records: one per call that got that far, labelled re-spent after a cut-off.
    after_call = {i for i, b in cut_off if b == "after_call"}
    assert len(record.tokens) == len(calls) - len(after_call)
    assert {t["index"] for t in record.tokens} == set(range(1, 16))
    assert all(t["respent"] == (t["attempt"] > 1) for t in record.tokens)
    assert record.tokens_total()["respent"] == 11 * sum(t["respent"] for t in record.tokens)
    assert record.epoch == epoch
    store.fs.rm(store.root, recursive=True)  # memory:// is one process-wide dict
