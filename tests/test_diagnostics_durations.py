"""DurationsPlugin: new obdask jobs start with the learned duration, not Dask's unknown."""

from __future__ import annotations

import tempfile
from pathlib import Path

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils_test import gen_cluster

import obdask
from obdask.diagnostics.durations import QUERY_OP
from obdask.plan import Plan


class _SeenDurations(SchedulerPlugin):
    """Records each new obdask task's prefix estimate as update_graph sees it."""

    name = "test-seen-durations"

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def update_graph(self, scheduler, *, tasks=(), **kwargs):  # noqa: ANN001
        for key in tasks:
            if isinstance(key, str) and "::" in key:
                self.seen[key] = scheduler.tasks[key].prefix.duration_average


def _plan(folder: Path, name: str, ids: range, seconds: float) -> Plan:
    text = "plan_id=durations\n" + "".join(
        f"- [ ] id=j{i} lane=1 payload=@cmd:sleep {seconds}\n" for i in ids)
    (folder / name).write_text(text)
    return Plan.from_file(folder / name)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_new_jobs_get_the_plans_learned_duration(c, s, a):
    folder = Path(tempfile.mkdtemp())
    probe = _SeenDurations()
    s.add_plugin(probe)  # in-process scheduler: the probe object itself is installed
    first = await obdask.run(_plan(folder, "a.md", range(4), 0.3), c)
    assert first.ok
    # Nothing was known yet: Dask's "unknown" marker (-1) for the first jobs.
    assert all(probe.seen[f"durations::j{i}"] < 0 for i in range(4))
    learned = await c.scheduler.obdask_durations_query()
    assert 0.25 < learned["plans"]["durations"] < 2.0
    assert learned["overall"] is not None
    # Run the probe after obdask's plugins (installed by the first run): re-add it last.
    s.remove_plugin(probe.name)
    probe.seen.clear()
    s.add_plugin(probe)
    second = await obdask.run(_plan(folder, "b.md", range(4, 8), 0.01), c)
    assert second.ok
    for i in range(4, 8):  # seeded from the first run instead of unknown (-1 / 0.5 s)
        assert abs(probe.seen[f"durations::j{i}"] - learned["plans"]["durations"]) < 1e-9
    assert QUERY_OP in s.handlers


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_prefixes_of_forgotten_jobs_are_dropped(c, s, a):
    import asyncio

    folder = Path(tempfile.mkdtemp())
    assert (await obdask.run(_plan(folder, "a.md", range(3), 0.01), c)).ok
    old = {f"durations::j{i}" for i in range(3)}
    assert old <= s.task_prefixes.keys()  # Dask keeps prefixes after the keys go
    for _ in range(400):  # the client releases the run's futures asynchronously
        if not old & s.tasks.keys():
            break
        await asyncio.sleep(0.05)
    assert not old & s.tasks.keys()
    (folder / "c.md").write_text("plan_id=other\n- [ ] id=x lane=1 payload=@cmd:true\n")
    assert (await obdask.run(Plan.from_file(folder / "c.md"), c)).ok
    # The next graph update dropped the unused prefixes; the estimate stays per plan.
    assert not old & s.task_prefixes.keys()
    assert "other::x" in s.task_prefixes
    learned = await c.scheduler.obdask_durations_query()
    assert learned["plans"]["durations"] > 0
