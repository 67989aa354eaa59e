"""obdask's Dask plugins: warm clone / loaded model tracking."""

from __future__ import annotations

from obdask.diagnostics.plugin import (
    ObdaskSchedulerPlugin,
    ObdaskWorkerPlugin,
    install,
    report_warm,
    warm_workers,
)

__all__ = [
    "ObdaskSchedulerPlugin",
    "ObdaskWorkerPlugin",
    "install",
    "report_warm",
    "warm_workers",
]
