"""Scheduler preload for the metrics-overhead benchmark: obdask without its metrics extension.

``dask scheduler --preload benchmarks/nometrics.py --preload obdask.preload.scheduler``:
drops ``"metrics"`` from :data:`obdask.server.EXTENSIONS` (the documented way to change
the extensions, before the plugin starts), so the scheduler plugin starts every other
extension and the worker plugin samples nothing, as ``obdask.metrics.enabled: false``
does.  Used by ``benchmarks/bench_metrics.py``, which runs two clusters from one
environment at once: a preload, not the config switch, tells them apart.
"""

from __future__ import annotations

from obdask.server import EXTENSIONS

EXTENSIONS.pop("metrics", None)
