"""Run a plan on a Dask cluster from a client: ``obdask.run``.

The runner resolves stores and workspace, compiles the plan, submits the
tasks (one graph per annotation batch), waits, and turns futures and worker
events into one record per job, written durably through fsspec.  It works
with any ``distributed.Client``, synchronous or asynchronous, or starts an
embedded ``LocalCluster`` when none is given.

This module holds a run's life: :func:`run` picks the client, ``_start`` prepares
(:mod:`obdask.prepare`), claims the plan id and its keys, places and submits
(:mod:`obdask.dispatch`), and ``_finish`` waits and writes the records
(:mod:`obdask.outcomes`, :mod:`obdask.collect`) into a :class:`RunResult`
(:mod:`obdask.result`).  The names those modules define that callers know from
here are importable from here too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from obdask import config
from obdask.collect import collect
from obdask.compile import CompiledPlan, compile_plan
from obdask.context import RunContext
from obdask.dispatch import (
    explain,
    input_record,
    install_plugins,
    job_annotations,
    place_on,
    submit_units,
    units_on,
)
from obdask.exceptions import ObdaskError
from obdask.optimize import Unit
from obdask.outcomes import (
    Progress,
    record_interrupted,
    scheduler_lost,
    subscribe_events,
    summarize,
    unsubscribe_events,
    wait_for_tasks,
)
from obdask.plan import Plan
from obdask.prepare import prepare, resolve_workspace, stage_files
from obdask.result import COLUMNS, RunResult
from obdask.runlock import RunLock

if TYPE_CHECKING:
    from distributed import Client, Future

__all__ = ["COLUMNS", "Progress", "RunResult", "compile_plan", "explain", "input_record",
           "job_annotations", "place_on", "plan_owner", "prepare", "resolve_workspace", "run",
           "stage_files", "units_on"]

logger = logging.getLogger(__name__)


def run(plan: Plan | str | os.PathLike[str], client: Client | str | None = None, *,
        workspace: str | None = None, resume: bool = False, artifacts: str | None = None,
        records: str | None = None, priority: int = 0, progress: Progress | None = None,
        n_workers: int | None = None) -> RunResult:
    """Run ``plan`` on Dask and return a :class:`RunResult`.

    Parameters
    ----------
    plan
        A :class:`~obdask.plan.Plan` or a path to a plan file.
    client
        Any ``distributed.Client``; with an asynchronous client this returns
        an awaitable.  A string: a scheduler address or scheduler file to
        connect to for this run.  None: Dask's order: the scheduler of dask config
        ``scheduler-address`` / ``scheduler-file`` (``DASK_SCHEDULER_ADDRESS``), else
        the current default client, else an embedded ``LocalCluster`` started (and
        closed) for this run.
    workspace
        Folder ``@cmd:`` steps run in and ``#apply`` diffs apply to.
    resume
        Skip jobs that an earlier run of the same plan completed.
    artifacts, records
        fsspec URLs of the artifact store and run records (default: config,
        else ``<plan folder>/.obdask/...``).
    priority
        Dask priority of every job of this run.
    progress
        Called as ``progress(finished, total)`` while the run goes on.
    """
    if not isinstance(plan, Plan):
        if not isinstance(plan, (str, os.PathLike)):
            raise TypeError(f"plan must be an obdask.Plan or a path to a plan file, "
                            f"not {type(plan).__name__}")
        plan = Plan.from_file(plan)
    kwargs = dict(workspace=workspace, resume=resume, artifacts=artifacts, records=records,
                  priority=priority, progress=progress)
    if client is None:
        # Dask's own order: the scheduler named in dask config (DASK_SCHEDULER_ADDRESS),
        # then the current default client, then an embedded cluster for this run.
        from obdask.cluster import configured_scheduler

        configured, _ = configured_scheduler()
        if configured is not None:
            client = configured
        else:
            from distributed import default_client

            try:
                client = default_client()
            except ValueError:
                return _run_embedded(plan, n_workers, kwargs)
    if isinstance(client, str):
        from obdask.cluster import connect

        with connect(client) as connected:
            return connected.sync(_run, connected, plan, **kwargs)
    return client.sync(_run, client, plan, **kwargs)


def _run_embedded(plan: Plan, n_workers: int | None, kwargs: dict[str, Any]) -> RunResult:
    from obdask.cluster import embedded_cluster

    with embedded_cluster(n_workers) as client:
        return client.sync(_run, client, plan, **kwargs)


async def _run(client: Client, plan: Plan, *, workspace: str | None, resume: bool,
               artifacts: str | None, records: str | None, priority: int,
               progress: Progress | None) -> RunResult:
    running = await _start(client, plan, workspace=workspace, resume=resume,
                           artifacts=artifacts, records=records, priority=priority)
    return await _finish(client, running, progress)


class _Phases:
    """Seconds of each phase of a run in this process, in order (the summary's ``client_s``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def end(self, name: str) -> None:
        """The phase ``name`` ends now (and the next one starts)."""
        now = time.perf_counter()
        self.seconds[name] = round(now - self._mark, 4)
        self._mark = now

    def restart(self) -> None:
        """The next phase starts now (the time since the last one is not a phase)."""
        self._mark = time.perf_counter()


@dataclass
class _Running:
    """A submitted run between :func:`_start` and :func:`_finish`."""

    plan: Plan
    compiled: CompiledPlan
    ctx: RunContext
    futures: dict[str, Future]
    span_id: str | None
    owner: str
    events: dict[str, list[dict[str, Any]]]
    started: float
    lock: RunLock
    units: dict[str, Unit] = field(default_factory=dict)  # job key -> its fused/batched task
    phases: _Phases = field(default_factory=_Phases)


async def _start(client: Client, plan: Plan, *, workspace: str | None, resume: bool,
                 artifacts: str | None, records: str | None, priority: int,
                 inputs: dict[str, list[Future]] | None = None, optimized: bool = True
                 ) -> _Running:
    """Prepare, place and submit: the job futures of a run that goes on without us.

    ``optimized=False`` keeps one task per job (``obdask.submit``: one future per job).
    """
    started = time.time()
    phases = _Phases()
    await install_plugins(client, plan)
    # Stores are read and written through fsspec, which blocks: never on the event loop.
    compiled, ctx = await asyncio.to_thread(
        prepare, plan, workspace=workspace, resume=resume, artifacts=artifacts, records=records)
    # One run of a plan at a time per record store, even on separate embedded clusters.
    lock = RunLock(ctx.records)
    if await asyncio.to_thread(lock.acquire, config.get_seconds("run.busy-plan-wait")):
        compiled, ctx = await asyncio.to_thread(  # what the earlier run completed counts
            prepare, plan, workspace=workspace, resume=resume, artifacts=artifacts,
            records=records, run_id=ctx.run_id)
    phases.end("prepare")
    try:
        placement = await place_on(client, compiled)
        phases.end("place")
        units = await units_on(client, compiled, placement, priority, inputs, optimized)
        phases.end("optimize")
        owner = await _claim_plan_id(client, plan, ctx)
    except BaseException:
        await asyncio.to_thread(lock.release)
        raise
    try:
        await _wait_keys_free(client, [j.key for j in compiled.runnable], plan)
        await asyncio.to_thread(_mark_started, ctx, plan, compiled)
        events = subscribe_events(client, ctx.run_id)
    except BaseException:
        await _release_plan_id(client, plan, owner)
        await asyncio.to_thread(lock.release)
        raise
    try:
        futures, span_id = submit_units(client, units, ctx, priority, placement.routes, inputs)
    except BaseException:
        unsubscribe_events(client, ctx.run_id)
        await _release_plan_id(client, plan, owner)
        await asyncio.to_thread(lock.release)
        raise
    phases.end("submit")
    return _Running(plan, compiled, ctx, futures, span_id, owner, events, started, lock,
                    {j.key: u for u in units if u.kind != "job" for j in u.jobs}, phases)


async def _finish(client: Client, running: _Running, progress: Progress | None) -> RunResult:
    """Wait for a started run, collect its records, write them: the :class:`RunResult`."""
    plan, ctx, phases = running.plan, running.ctx, running.phases
    try:
        try:
            phases.restart()  # a PlanFuture's wait may begin well after its submit
            await wait_for_tasks(client, running.futures, progress)
            phases.end("wait")
            outcomes = await collect(client, running.compiled, running.futures, ctx,
                                     running.events, running.units)
            phases.end("collect")
            running.futures = {}
        except Exception as exc:
            if not scheduler_lost(client, exc):
                raise
            await record_interrupted(client, plan, running.compiled, ctx, running.started,
                                      exc)
        finally:
            unsubscribe_events(client, ctx.run_id)
            await _release_plan_id(client, plan, running.owner)
        duration = time.time() - running.started
        summary = summarize(plan, ctx, outcomes, duration)
        summary["span"] = running.span_id
        summary["client_s"] = phases.seconds
        location = await asyncio.to_thread(ctx.records.write_records, outcomes, summary,
                                           redacted=True)  # collect() redacted them
    finally:
        await asyncio.to_thread(running.lock.release)
    return RunResult(plan_id=plan.plan_id, run_id=ctx.run_id, records=outcomes,
                     location=location, duration_s=duration, summary=summary,
                     artifacts=ctx.artifacts)


def plan_owner(plan: Plan) -> str:
    """What tells two plans with one plan id apart: the plan file's absolute path.

    A plan built from text has no file: a digest of its steps stands in.
    """
    if plan.path:
        return os.path.abspath(plan.path)
    import hashlib

    blob = "\n".join(f"{s.id}:{s.line}:{s.payload.prefix}:{s.payload.body}"
                      for s in plan.steps)
    return f"<plan text {hashlib.sha1(blob.encode()).hexdigest()[:12]}>"


async def _claim_plan_id(client: Client, plan: Plan, ctx: RunContext) -> str:
    """Hold the plan id on the cluster; refuse when a different plan holds it.

    Default plan ids come from file names, so ``a/plan.md`` and ``b/plan.md``
    are both ``plan``: on one scheduler they would share task keys and run
    records.  The same plan run twice is the busy-plan wait's business.
    """
    import socket

    owner = plan_owner(plan)
    label = f"{owner} (run {ctx.run_id} from {socket.gethostname()})"
    other = await client.scheduler.obdask_plan_claim(plan_id=plan.plan_id, owner=owner,
                                                     client=client.id, label=label)
    if other:
        raise ObdaskError(
            f"plan id {plan.plan_id!r} is in use on this cluster by {other}; {owner} is a "
            f"different plan with the same id, and they would share task keys and run "
            f"records: give one of them its own id with a 'plan_id=<name>' line")
    return owner


async def _release_plan_id(client: Client, plan: Plan, owner: str) -> None:
    try:
        await client.scheduler.obdask_plan_release(plan_id=plan.plan_id, owner=owner,
                                                   client=client.id)
    except Exception as exc:  # noqa: BLE001 - the claim also ends with the client
        logger.debug("plan id %s not released: %s", plan.plan_id, exc)


def _mark_started(ctx: RunContext, plan: Plan, compiled: CompiledPlan) -> None:
    """``started.json`` beside the run's records: ``obdask logs`` follows the run."""
    from obdask.outputs import mark_started

    mark_started(ctx.records, {"plan": plan.plan_id, "plan_path": plan.path,
                               "jobs": len(compiled.jobs)})


async def _wait_keys_free(client: Client, keys: list[str], plan: Plan) -> None:
    """Refuse to start while another run of the same plan holds its keys."""
    if not keys:
        return
    timeout = config.get_seconds("run.busy-plan-wait")
    deadline = time.monotonic() + timeout
    while True:
        held = await client.scheduler.obdask_jobs_held(keys=keys)
        if not held:
            return
        if time.monotonic() > deadline:
            raise ObdaskError(
                f"plan {plan.plan_id!r} is already running on this cluster ({held[0]} is "
                "still held); wait for that run to finish or give this plan another plan_id="
            )
        await asyncio.sleep(0.05)
