"""Exception classes raised by obdask.

Each derives from a built-in so callers can catch broadly (``ValueError``)
or precisely (``PlanError``).  Messages name the job, step or file at fault
and say how to fix it.
"""

from __future__ import annotations


class ObdaskError(Exception):
    """Base class for every error obdask raises on purpose."""


class PlanError(ObdaskError, ValueError):
    """A plan file is malformed: names the file, line number and problem."""


class ConfigError(ObdaskError, ValueError):
    """A configuration value under ``obdask:`` is invalid."""


class PayloadError(ObdaskError, RuntimeError):
    """A payload could not be executed (missing file, failing command, ...)."""


class CommandRefused(PayloadError):
    """A ``@cmd:`` payload names an executable that is not on the allowlist."""


class IntegrityError(PayloadError):
    """Content does not match its pinned ``#sha1=`` hash."""


class PlacementError(ObdaskError, RuntimeError):
    """No worker in the cluster can ever run a job (missing resource)."""


class ClusterUnreachable(ObdaskError, ConnectionError):
    """The scheduler named by ``--scheduler`` / a scheduler file cannot be reached."""


class ModelError(PayloadError):
    """A model call failed: unknown role, model missing everywhere, bad reply."""


class BudgetExceeded(ObdaskError, RuntimeError):
    """A token budget has no room left for a model call."""


class JobFailed(PayloadError):
    """A job ran and failed; carries the job's result record in ``.record``."""

    def __init__(self, message: str, record: dict | None = None) -> None:
        super().__init__(message)
        self.record = record or {}

    def __reduce__(self):
        return (type(self), (str(self), self.record))


class SecurityError(ObdaskError, ValueError):
    """TLS material is missing or invalid (``obdask certs init``, ``--tls DIR``)."""


class SandboxUnavailable(PayloadError):
    """``obdask.cmd.sandbox.mode: require`` and bubblewrap cannot run on this worker."""
