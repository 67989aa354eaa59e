"""The function every obdask task runs on a worker: ledger, payload, record.

A task first looks up its step in the run's ledger: if the step already
completed (the task is re-run after a worker was lost), the recorded result
is returned and the payload is not applied again.  Otherwise it runs the
payload, writes the ledger entry, and returns the job record.  A failing
payload raises :class:`~obdask.exceptions.JobFailed`, so Dask's own retries
and failure propagation (dependents never run) apply.

A fused chain or a batch (:mod:`obdask.optimize`) is one task running
:func:`run_unit`: each of its jobs goes through :func:`run_job` as above and
is retried in place up to its own retries; on local disk the task's jobs share
one append-only ledger file (:class:`~obdask.records.UnitLedger`).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from obdask.exceptions import BatchFailed, ChainFailed, JobFailed, ObdaskError
from obdask.payloads import execute
from obdask.records import JobRecord, UnitLedger
from obdask.redact import redact, redact_obj
from obdask.workspace import job_workspace

if TYPE_CHECKING:
    from obdask.compile import JobSpec
    from obdask.context import RunContext

logger = logging.getLogger(__name__)

EVENT_TOPIC = "obdask-jobs"


def _worker():
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def _emit(worker, event: dict[str, Any]) -> None:
    if worker is not None:
        worker.log_event(EVENT_TOPIC, event)


def run_job(spec: JobSpec, ctx: RunContext, *deps: dict[str, Any],
            ledger: UnitLedger | None = None) -> JobRecord:
    """Run one job on a worker and return its record (see module docstring).

    ``ledger``: the ledger of the fused or batched task running this job
    (:meth:`~obdask.records.RunStore.unit_ledger`); default: the job's own file.
    """
    worker = _worker()
    where = worker.address if worker is not None else socket.gethostname()
    deps = _own_records(spec, deps)
    if ledger is not None:
        previous = ledger.get(spec.step_id)
    else:
        previous = ctx.records.ledger_get(spec.step_id, units=False)
    if previous is not None and previous.get("status") == "done":
        _emit(worker, {"key": spec.key, "run": ctx.run_id, "event": "replayed", "worker": where})
        return JobRecord(previous, replayed=True)
    started = time.time()
    record: dict[str, Any] = {
        "key": spec.key, "step": spec.step_id, "plan": spec.plan_id, "run_id": ctx.run_id,
        "fingerprint": spec.fingerprint, "worker": where, "started": started,
    }
    running = _track(worker, spec, started)
    try:
        workspace, clone_warm = job_workspace(spec, ctx.workspace)
        record["warm"] = _warmth(spec, worker, clone_warm)
        if workspace != ctx.workspace:
            ctx = dataclasses.replace(ctx, workspace=workspace)
            record["workspace"] = workspace
        result = execute(spec, ctx, deps)
    except ObdaskError as exc:
        failure: ObdaskError | None = exc
    else:
        failure = None
    finally:
        if running is not None:
            running.pop(spec.key, None)
    if failure is not None:
        # Raised outside the except block: no chained context to pickle back.
        message = redact(str(failure))  # a command line or stderr may hold a password
        record.update(status="failed", error=message, finished=time.time(),
                      exit_code=getattr(failure, "exit_code", None))
        record["duration_s"] = record["finished"] - started
        record.update(getattr(failure, "fields", {}))
        record = redact_obj(record)
        _emit(worker, {"key": spec.key, "run": ctx.run_id, "event": "failed",
                       "worker": where, "error": message})
        _publish(worker, spec, record)
        raise JobFailed(message, record)
    _report_localities(spec)
    finished = time.time()
    record.update(result)
    record.update(status="done", finished=finished, duration_s=finished - started)
    record = redact_obj(record)
    if ledger is not None:
        ledger.put(spec.step_id, record)
    else:
        ctx.records.ledger_put(spec.step_id, record)
    if spec.dedupe:
        ctx.artifacts.put_result(spec.dedupe, record)
    _publish(worker, spec, record)
    return JobRecord(record)


def _own_records(spec: JobSpec, deps: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
    """The records of ``spec``'s own dependencies among ``deps``, the results of the
    tasks it waited for: a batch's result holds its other jobs' records in ``members``."""
    if not any(getattr(dep, "members", None) for dep in deps):
        return deps
    wanted = set(spec.deps)
    own: list[dict[str, Any]] = []
    for dep in deps:
        members = getattr(dep, "members", None)
        if members:  # a chain's result is its last link's record, a batch's its first's
            own.extend(r for r in (dep, *members) if r.get("key") in wanted)
        else:  # a single job's record, or a user's future (dispatch.input_record)
            own.append(dep)
    return tuple(own)


def _track(worker, spec: JobSpec, started: float) -> dict | None:  # noqa: ANN001
    """Note a job with a timeout as running, for time pressure (obdask.server.pressure)."""
    if worker is None or not spec.timeout:
        return None
    from obdask.server.worker import track_running

    try:
        return track_running(spec.key, started, spec.timeout, worker)
    except Exception:  # metrics must never fail a job
        logger.debug("could not track %s", spec.key, exc_info=True)
        return None


#: Fields of a job record the scheduler's metrics extension keeps.
METRIC_FIELDS = ("run_id", "worker", "started", "finished", "duration_s", "status",
                 "exit_code", "warm", "error")


def _publish(worker, spec: JobSpec, record: dict[str, Any]) -> None:  # noqa: ANN001
    """Send the job's metrics record to the scheduler (one batched message)."""
    if worker is None:
        return
    from obdask.server.worker import send_record

    row = {k: record.get(k) for k in METRIC_FIELDS}
    if row["error"] is not None:
        row["error"] = str(row["error"])[:200]
    row.update(job=spec.key, plan=spec.plan_id, step=spec.step_id, lane=spec.lane,
               kind="model" if spec.payload.is_model_task else spec.payload.prefix,
               model=record.get("model") or spec.model)
    try:
        send_record("job", row, worker)
    except Exception:  # metrics must never fail a job
        logger.debug("could not send the metrics record of %s", spec.key, exc_info=True)


def _warmth(spec: JobSpec, worker, clone_warm: bool | None) -> bool | None:  # noqa: ANN001
    """Whether this worker was warm for the job's locality (None: no locality)."""
    if not spec.localities:
        return None
    if clone_warm is not None:
        return clone_warm
    if worker is None:
        return False
    from obdask.server.worker import state_of

    warm = state_of(worker).warm_keys()
    return any(key in warm for key in spec.localities)


def _report_localities(spec: JobSpec) -> None:
    """Tell the scheduler this worker now holds the job's checkout / repo files."""
    if not spec.localities:
        return
    from obdask.server.worker import report_warm

    for key in spec.localities:
        if not key.startswith("model:"):
            report_warm("clone", key)


class UnitRecord(JobRecord):
    """The record a fused or batched task returns: its anchor job's record (what a
    dependent reads), with the other jobs' records in ``members``."""

    __slots__ = ("members",)

    def __init__(self, record: dict[str, Any], members: list[dict[str, Any]]) -> None:
        super().__init__(record)
        self.members = members

    def __reduce__(self):  # one pickle, members included
        return (UnitRecord, (dict(self), self.members))


def run_unit(kind: str, specs: tuple[JobSpec, ...], retries: tuple[int, ...],
             ctx: RunContext, *deps: dict[str, Any], gates: bool = False) -> UnitRecord:
    """Run a fused chain or a batch of jobs on one worker (see :mod:`obdask.optimize`).

    Each job goes through :func:`run_job` (ledger, timeout, record), retried in
    place up to its own ``retries``.  In a ``chain`` each link gets the record of
    the link before it; a failing link raises
    :class:`~obdask.exceptions.ChainFailed`, so Dask skips the chain's dependents.
    In a ``batch`` each job gets ``deps``; a failing job's record is kept and its
    batch-mates run on; with ``gates`` (the batch has dependents) the task then
    raises :class:`~obdask.exceptions.BatchFailed`, so Dask skips them.
    """
    ledger = ctx.records.unit_ledger(specs[0].step_id)
    try:
        unit = _run_jobs(kind, specs, retries, ctx, deps, ledger)
    finally:
        if ledger is not None:
            ledger.close()
    if gates:
        records = [dict(unit), *unit.members]
        failed = next((r for r in records if r.get("status") == "failed"), None)
        if failed is not None:
            raise BatchFailed(failed.get("error") or f"job {failed.get('key')} failed",
                              failed, records)
    return unit


def _run_jobs(kind: str, specs: tuple[JobSpec, ...], retries: tuple[int, ...],
              ctx: RunContext, deps: tuple[dict[str, Any], ...],
              ledger: UnitLedger | None) -> UnitRecord:
    records: list[dict[str, Any]] = []
    previous: tuple[dict[str, Any], ...] = deps
    for spec, tries in zip(specs, retries, strict=True):
        try:
            record = _with_retries(spec, tries, ctx, previous, ledger)
        except JobFailed as exc:
            if kind == "chain":
                raise ChainFailed(str(exc), exc.record, records) from None
            record = exc.record
        except Exception as exc:  # noqa: BLE001 - one job's bug must not sink its batch-mates
            if kind == "chain":
                raise
            record = {"key": spec.key, "step": spec.step_id, "status": "failed",
                      "fingerprint": spec.fingerprint,
                      "error": f"job {spec.key}: {type(exc).__name__}: {exc}"}
        records.append(record)
        if kind == "chain":
            previous = (record,)
    anchor = len(records) - 1 if kind == "chain" else 0
    members = [r for i, r in enumerate(records) if i != anchor]
    return UnitRecord(records[anchor], members)


def _with_retries(spec: JobSpec, retries: int, ctx: RunContext,
                  deps: tuple[dict[str, Any], ...],
                  ledger: UnitLedger | None = None) -> dict[str, Any]:
    """:func:`run_job`, again after a failure up to ``retries`` times; the record
    carries ``tries_in_task`` and the reasons of the failed tries."""
    reasons: list[str] = []
    for attempt in range(1, retries + 2):
        try:
            record = dict(run_job(spec, ctx, *deps, ledger=ledger))
        except JobFailed as exc:
            reasons.append(f"attempt {attempt} failed on {exc.record.get('worker')}: {exc}")
            if attempt > retries:
                exc.record.update(tries_in_task=attempt, retries_in_task=reasons[:-1])
                raise
            continue
        record.update(tries_in_task=attempt, retries_in_task=reasons)
        return record
    raise AssertionError("unreachable")  # pragma: no cover
