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


class StoreError(ObdaskError, OSError):
    """A record or artifact store URL cannot be used: unknown protocol, unreachable or
    not writable.  Names the URL, the setting that chose it and the fix."""


class PlacementError(ObdaskError, RuntimeError):
    """No worker in the cluster can ever run a job (missing resource)."""


class ClusterUnreachable(ObdaskError, ConnectionError):
    """The scheduler named by ``--scheduler`` / a scheduler file cannot be reached."""


class SchedulerLost(ObdaskError, ConnectionError):
    """The scheduler went away during a run; ``.result`` holds what is known.

    The records of every job that finished were written; ``--resume`` on a
    restarted cluster finishes the plan without applying them again.
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


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


class ChainFailed(JobFailed):
    """A link of a fused chain failed: ``.record`` is its record, ``.done`` the
    records of the links before it (see :mod:`obdask.optimize`)."""

    def __init__(self, message: str, record: dict | None = None,
                 done: list | None = None) -> None:
        super().__init__(message, record)
        self.done = list(done or [])

    def __reduce__(self):
        return (type(self), (str(self), self.record, self.done))


class BatchFailed(ChainFailed):
    """A job of a batch with dependents failed: ``.record`` is its record, ``.done``
    the records of all the batch's jobs, which all ran (see :mod:`obdask.optimize`)."""


class InvalidTransition(ObdaskError, ValueError):
    """A session move breaks the navigation rules of the 5x3 state machine.

    ``state`` is the position (e.g. ``"S1P1"``), ``move`` the refused move
    (e.g. ``"P3"``) and ``legal`` the moves that were allowed there.
    """

    def __init__(self, message: str, state: str | None = None, move: str | None = None,
                 legal: tuple = ()) -> None:
        super().__init__(message)
        self.state = state
        self.move = move
        self.legal = tuple(legal)

    def __reduce__(self):
        return (type(self), (str(self), self.state, self.move, self.legal))


class FlowCodeError(ObdaskError, ValueError):
    """A flow code (``S1P123S2P12``) is malformed or records an illegal path."""


class SessionError(ObdaskError, RuntimeError):
    """A session record cannot be created, read or written (names the session and file)."""


class SessionExists(SessionError):
    """A session with this id is already recorded."""


class UnknownSession(ObdaskError, LookupError):
    """No session with this id is recorded in the session store."""


class SnapshotConflict(SessionError):
    """The snapshot recorded at a position differs from the one being written there.

    Raised when a resume would run a different process at a recorded position,
    or a driver writes different content where its own epoch already wrote.
    """


class LeaseLost(ObdaskError, RuntimeError):
    """A session driver was superseded: a newer driver holds a higher epoch.

    Raised to the stale driver on its write.  ``kept`` is False when that write
    was refused or voided (it never becomes part of the record), True when the
    newer driver had already read it (it stays; nothing is lost or doubled),
    None when the newer driver had not sealed its takeover yet (the write stays
    exactly when the newer driver's read saw it).
    """

    def __init__(self, message: str, session: str | None = None, epoch: int | None = None,
                 highest: int | None = None, kept: bool | None = None) -> None:
        super().__init__(message)
        self.session = session
        self.epoch = epoch
        self.highest = highest
        self.kept = kept

    def __reduce__(self):
        return (type(self), (str(self), self.session, self.epoch, self.highest, self.kept))


FencedError = LeaseLost


class SecurityError(ObdaskError, ValueError):
    """TLS material is missing or invalid (``obdask certs init``, ``--tls DIR``)."""


class SandboxUnavailable(PayloadError):
    """``obdask.cmd.sandbox.mode: require`` and bubblewrap cannot run on this worker."""


class JudgeError(ObdaskError, RuntimeError):
    """The judge cannot run: unknown target, bad panel, no synthesis possible."""


class QuorumNotMet(JudgeError):
    """Fewer experts than the quorum answered by the deadline; ``.experts`` lists them all."""

    def __init__(self, message: str, experts: list | None = None) -> None:
        super().__init__(message)
        self.experts = list(experts or [])
