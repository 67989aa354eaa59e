"""Two drivers racing for one session on the cluster: exactly one advances it, no
process is lost or run twice.  Each trial submits two driver tasks for a new session
back to back; trials run ten sessions at a time (more races at once, not fewer)."""

from __future__ import annotations

import concurrent.futures

import pytest

from obdask.exceptions import SessionError
from obdask.session.api import Session, new_session_id
from tests.session.scripted import FULL


def _trial_start(client):
    handle = Session(new_session_id(), client)
    handle.store.create(handle.id, "race")
    handle._submit()
    first = handle.future
    handle._submit()  # a second driver for the same session, at once
    return handle, (first, handle.future)


def _check(handle, futures):
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=120))
        except SessionError as exc:  # refused: another driver holds the session
            assert "driven by epoch" in str(exc), exc
            outcomes.append(None)
    record = handle.store.read(handle.id)
    assert record.flow_code == FULL and record.state.finished, record.flow_code
    # no process lost or doubled: 1..15 once each, one model call each, nothing re-spent
    assert [snap.index for snap in record.snapshots] == list(range(1, 16))
    assert [c.key for c in record.calls] == [f"{s.index:04d}-{s.position}-1"
                                             for s in record.snapshots]
    assert record.respent == 0 and record.voided == []
    # exactly one driver advanced it: every snapshot is of one epoch, that driver's
    (epoch,) = {snap.epoch for snap in record.snapshots}
    advanced = [o for o in outcomes if o is not None and o["epoch"] == epoch]
    assert len(advanced) == 1 and advanced[0]["state"] == "done"
    late = [o for o in outcomes if o is not None and o["epoch"] != epoch]
    assert all(o["flow_code"] == FULL for o in late)  # came after the end: ran nothing
    return outcomes.count(None)


def _race(client, trials, at_once=10):
    refused = 0
    for start in range(0, trials, at_once):
        batch = [_trial_start(client) for _ in range(min(at_once, trials - start))]
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            refused += sum(pool.map(lambda t: _check(*t), batch))
    return refused


def test_two_drivers_race_for_one_session(cluster, model):
    refused = _race(cluster, 10)
    assert refused >= 1  # the race did happen: a driver was turned away


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ten rounds of ten sessions: minutes on a loaded machine
def test_two_drivers_race_for_one_session_100_trials(cluster, model):
    refused = _race(cluster, 100)
    assert refused >= 50
