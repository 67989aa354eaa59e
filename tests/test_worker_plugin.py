"""obdask's worker plugin (:mod:`obdask.server.worker`) with Dask's own test cluster."""

from __future__ import annotations

import dask
from distributed.utils_test import gen_cluster

from obdask.server.worker import DASK_PROFILER, NAME, ObdaskWorkerPlugin


def _profiling(worker) -> bool:
    pc = worker.periodic_callbacks.get(DASK_PROFILER)
    return pc is not None and pc.is_running()


# gen_cluster turns Dask's profiler off by default; a real worker has it on
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)],
             config={"distributed.worker.profile.enabled": True})
async def test_dasks_profiler_is_off_with_obdask_unless_configured(c, s, a):
    """Off while the plugin is installed (tests/test_metrics.py: real worker processes),
    kept with ``obdask.metrics.dask-profile: true``, and back when the plugin goes."""
    assert _profiling(a)
    with dask.config.set({"obdask.metrics.dask-profile": True}):
        await c.register_plugin(ObdaskWorkerPlugin(metrics=False), name=NAME)
    assert _profiling(a)
    await c.unregister_worker_plugin(NAME)
    await c.register_plugin(ObdaskWorkerPlugin(metrics=False), name=NAME)
    assert not _profiling(a) and DASK_PROFILER not in a.periodic_callbacks
    await c.unregister_worker_plugin(NAME)  # its teardown gives Dask its profiler back
    assert _profiling(a)
