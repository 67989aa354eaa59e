"""Sessions in metrics (issue 12, item 3): ``metrics.sessions`` and the 5x3 grid component.

The sessions' shared state is set through the sessions extension's real
handlers (lease, update) on a real LocalCluster's scheduler.
"""

from __future__ import annotations

import logging

import pytest

from obdask import metrics


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0",
                      silence_logs=logging.CRITICAL) as lc:
        with Client(lc) as c:
            from obdask.server import install

            install(c)
            sched = c.scheduler
            for sid, holder, state in [
                    ("sa", "w1", {"state": "running", "flow_code": "S1P123S2P1",
                                  "position": "S2P1", "process": "Brainstorm",
                                  "tokens": {"input": 120, "output": 30}, "processes": 4}),
                    ("sb", "w2", {"state": "waiting", "flow_code": "S1P123S2P123S3P123",
                                  "position": "S3P3", "process": "Feedback",
                                  "tokens": {"input": 900, "output": 100},
                                  "question": {"id": "c1", "question": "Ship it?"}}),
                    ("sc", "w3", {"state": "done", "flow_code": "S1P1", "position": "done",
                                  "process": None})]:
                epoch = c.sync(sched.obdask_session_acquire, session=sid, holder=holder,
                               key=f"drv-{sid}")["epoch"]
                assert c.sync(sched.obdask_session_update, session=sid, epoch=epoch,
                              state=state)["ok"]
            yield c


def test_sessions_frame(client):
    frame = metrics.sessions(client)
    assert list(frame.index) == ["sa", "sb", "sc"]
    sa, sb = frame.loc["sa"], frame.loc["sb"]
    assert (sa.state, sa.schedule, sa.schedule_name, sa.process, sa.process_name) == (
        "running", 2, "Plan", 1, "Brainstorm")
    assert (sa.flow_code, sa.input_tokens, sa.output_tokens, sa.live) == (
        "S1P123S2P1", 120, 30, True)
    assert (sb.state, sb.schedule, sb.process, sb.question) == ("waiting", 3, 3, "Ship it?")
    assert frame.loc["sc", "position"] == "done" and not frame.loc["sc", "live"]


def test_sessions_component_highlights_the_current_cells(client):
    pytest.importorskip("bokeh")

    def render(dask_scheduler):
        from obdask.dashboard.components import Sessions

        comp = Sessions(dask_scheduler)
        comp.update()
        return dict(comp.grid.data), dict(comp.source.data)

    grid, table = client.run_on_scheduler(render)
    pairs = zip(grid["schedule"], grid["process"], strict=True)
    cells = {(s, p): i for i, (s, p) in enumerate(pairs)}
    assert len(cells) == 15
    here = [k for k, i in cells.items() if grid["count"][i]]
    assert sorted(here) == [("Implement", "P3"), ("Plan", "P1")]  # sc is done: not shown
    assert grid["color"][cells[("Plan", "P1")]] != grid["color"][cells[("Plan", "P2")]]
    assert grid["name"][cells[("Implement", "P3")]] == "Feedback"
    assert grid["sessions"][cells[("Plan", "P1")]] == "sa"
    assert table["session"] == ["sc", "sb", "sa"]  # newest first
    assert table["flow_code"][1] == "S1P123S2P123S3P123" and table["tokens"][1] == "1000"
