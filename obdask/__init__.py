"""obdask: multi-agent LLM coding orchestration on a Dask cluster."""

from __future__ import annotations

from obdask import config  # noqa: F401  (registers obdask.yaml defaults in dask.config)
from obdask.exceptions import (
    BudgetExceeded,
    CommandRefused,
    IntegrityError,
    ModelError,
    ObdaskError,
    PayloadError,
    PlacementError,
    PlanError,
)
from obdask.plan import Plan, Step
from obdask.redact import install as _install_redaction

_install_redaction()  # every obdask.* log record is redacted (obdask/redact.py)

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded", "CommandRefused", "IntegrityError", "ModelError", "ObdaskError",
    "PayloadError", "PlacementError", "Plan", "PlanError", "Session", "Step", "run", "submit",
    "__version__",
]


def __getattr__(name: str):
    # Lazy: importing obdask must not import distributed (plans parse without Dask).
    if name == "run":
        from obdask.runner import run

        return run
    if name == "Session":
        from obdask.session.api import Session

        return Session
    if name == "submit":
        from obdask.plan_futures import submit

        return submit
    raise AttributeError(f"module 'obdask' has no attribute {name!r}")
