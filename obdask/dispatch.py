"""Place a prepared plan on a cluster and submit its units; ``explain`` shows the same.

:func:`place_on` is the placement phase against one snapshot of the cluster,
:func:`units_on` the optimisation pass (chains and batches, bounded by the durations
the scheduler's metrics remember), :func:`submit_units` one ``client.get`` per batch of
identical annotations under one Dask span per plan.  :func:`explain` runs the same
phases without submitting anything (``obdask explain``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from obdask import config
from obdask.compile import CompiledPlan, Job, annotations, compile_plan
from obdask.context import RunContext
from obdask.exceptions import PlacementError
from obdask.optimize import Options, Unit, optimize, unit_annotations, unit_batches
from obdask.placement import Placement
from obdask.plan import Plan
from obdask.prepare import localities_policy, prepare

if TYPE_CHECKING:
    from distributed import Client, Future

logger = logging.getLogger(__name__)


async def install_plugins(client: Client, plan: Plan) -> None:
    """The obdask scheduler plugin (idempotent); it validates obdask.llm.budgets first."""
    from obdask.server import install

    result = install(client)
    if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
        await result


async def place_on(client: Client, compiled: CompiledPlan) -> Placement:
    """The placement phase against ``client``'s cluster: one view, :func:`place`.

    A cluster without workers, or without a worker able to run some job, is
    waited on for ``obdask.run.wait-for-resources`` (0: fail at once).
    """
    from obdask.placement import cluster_view, place, retry_placement

    if compiled.runnable and not (await client.scheduler.identity(n_workers=-1)).get(
            "workers"):
        await _wait_for_a_worker(client)
    wanted = set()
    if config.get("placement.locality"):
        wanted = {k for j in compiled.runnable for k in j.spec.localities}

    async def attempt() -> Placement:
        return place(compiled, await cluster_view(client, wanted))

    return await retry_placement(attempt)


async def _wait_for_a_worker(client: Client) -> None:
    """A cluster without workers would leave every job waiting: fail or wait, per config."""
    limit = config.get_seconds("run.wait-for-resources")
    try:
        if limit <= 0:
            raise TimeoutError
        await client.wait_for_workers(1, timeout=limit)
    except (TimeoutError, asyncio.TimeoutError):
        raise PlacementError(
            f"the cluster at {client.scheduler.address} has no workers; start some "
            "(dask worker ADDR --preload obdask.preload.worker) or set "
            "obdask.run.wait-for-resources to wait for them"
        ) from None


def job_annotations(job: Job, routes: dict[str, list[str]], priority: int = 0
                    ) -> dict[str, Any]:
    """The Dask annotations ``run`` submits ``job`` with (``explain`` shows the same)."""
    preferred = routes.get(job.key)
    return annotations(job, priority=priority, workers=preferred,
                       allow_other_workers=True if preferred else None)


def explain(plan: Plan, client: Client | None = None, priority: int = 0) -> dict[str, Any]:
    """What ``run`` would submit: every job with its Dask key and annotations.

    With a client, the plan is prepared and placed exactly as :func:`run` does
    it on that cluster (stores read for resume/dedupe; nothing is submitted).
    Without one, what depends on the cluster is listed under ``cluster_dependent``.
    """
    if client is None:
        from obdask.placement import ClusterView, place

        compiled = compile_plan(plan, default_retries=config.get_int("run.retries"),
                                default_timeout=config.get_seconds("run.timeout"),
                                localities_for=localities_policy(plan))
        placement = place(compiled, ClusterView())

        def annotate(job: Job) -> dict[str, Any]:
            return job_annotations(job, placement.routes, priority)

        units = optimize(compiled, annotate)
        return _explained(compiled, placement, priority, units)
    return client.sync(_explain_on, client, plan, priority)


async def _explain_on(client: Client, plan: Plan, priority: int) -> dict[str, Any]:
    await install_plugins(client, plan)
    compiled, _ = await asyncio.to_thread(prepare, plan)
    placement = await place_on(client, compiled)
    units = await units_on(client, compiled, placement, priority)
    return _explained(compiled, placement, priority, units)


def _explained(compiled: CompiledPlan, placement: Placement, priority: int,
               units: list[Unit]) -> dict[str, Any]:
    """Each job's row, with ``task`` (the job id whose Dask key runs it) and ``unit``
    (``job``, ``chain`` or ``batch``); ``optimize`` lists the chains and batches."""
    from obdask.optimize import describe

    def annotate(job: Job) -> dict[str, Any]:
        return job_annotations(job, placement.routes, priority)

    unit_of = {j.key: u for u in units for j in u.jobs}
    jobs = compiled.explain()
    for row, job in zip(jobs, compiled.jobs, strict=True):
        unit = unit_of.get(job.key)
        row["resources"] = job.resources
        row["dask_key"] = list(job.spec.dask_key)
        row["annotations"] = unit_annotations(unit, annotate) if unit else None
        row["task"] = unit.key if unit else None
        row["unit"] = unit.kind if unit else None
    return {"plan": compiled.plan.plan_id, "jobs": jobs, "optimize": describe(units),
            "cluster_dependent": placement.cluster_dependent}


def submit_units(client: Client, units: list[Unit], ctx: RunContext, priority: int,
            routes: dict[str, list[str]] | None = None,
            inputs: dict[str, list[Future]] | None = None,
            ) -> tuple[dict[str, Future], str | None]:
    """Submit the units (jobs, fused chains, batches), one ``client.get`` per annotation batch.

    All of a run's tasks share one Dask span ``("obdask", plan_id)``, so the
    dashboard's fine performance metrics and the scheduler's ``spans``
    extension can show a run's compute, transfer and wait time as one line.
    Returns the futures by job key (a unit's jobs share its future) and the span
    id (None when nothing ran).  ``inputs`` maps a step id to the user's futures
    that step waits for; each reaches the job as one more dependency record
    (:func:`input_record`).
    """
    from dask._task_spec import Task, TaskRef
    from distributed import span

    from obdask.execute import run_job, run_unit
    from obdask.keys import dask_key_of

    # a job's dependency runs in the task of its unit: the job itself, a chain's last
    # link (its key) or a batch (its first job's key, one reference for all of them)
    task_of = {j.key: u.anchor.key for u in units for j in u.jobs}
    futures: dict[str, Future] = {}
    routes = routes or {}

    def annotate(job: Job) -> dict[str, Any]:
        return job_annotations(job, routes, priority)

    def task(unit: Unit) -> Task:
        head = unit.head
        deps = [TaskRef(dask_key_of(d)) for d in dict.fromkeys(
            task_of[d] for d in head.spec.deps if d in task_of)]
        deps += [Task(f"obdask-input-{head.key}-{i}", input_record, str(f.key), f)
                 for i, f in enumerate((inputs or {}).get(head.spec.step_id, ()))]
        key = unit.anchor.spec.dask_key
        if unit.kind == "job":
            return Task(key, run_job, head.spec, ctx, *deps)
        gates = {"gates": True} if unit.gates else {}
        # Dask sends a task to a worker holding its dependencies' results when it can;
        # a unit's are a few small job records, so the units after a fan-out's first
        # job would all queue on its worker. As a data producer (what Dask calls a root
        # task) a unit goes to whichever worker has a free thread; a route or resource
        # restriction (warm clone, GPU) still decides where it may run.
        return Task(key, run_unit, unit.kind, tuple(j.spec for j in unit.jobs),
                    tuple(j.retries for j in unit.jobs), ctx, *deps,
                    _data_producer=bool(deps), **gates)

    if not task_of:
        return futures, None
    # No await in here: the span annotation (global dask config) covers exactly these graphs.
    with span("obdask", ctx.plan_id) as span_id:
        for batch in unit_batches(units, annotate):
            dsk = {u.anchor.spec.dask_key: task(u) for u in batch.units}
            submitted = dict(zip(dsk, client.get(dsk, list(dsk), sync=False,
                                                 **batch.annotations), strict=True))
            for unit in batch.units:
                future = submitted[unit.anchor.spec.dask_key]
                futures.update((j.key, future) for j in unit.jobs)
    return futures, span_id


async def units_on(client: Client, compiled: CompiledPlan, placement: Placement,
                   priority: int = 0, inputs: dict[str, list[Future]] | None = None,
                   optimized: bool = True) -> list[Unit]:
    """The optimisation pass (:mod:`obdask.optimize`) as ``run`` does it on ``client``'s cluster.

    A job's expected duration, which bounds batches, is the last duration of its
    step in the scheduler's metrics (an earlier run), else the plan's median.
    """
    options = Options.from_config(optimized)

    def annotate(job: Job) -> dict[str, Any]:
        return job_annotations(job, placement.routes, priority)

    estimate = None
    if options.batch and len(compiled.runnable) > 1:
        estimate = await _estimates(client, compiled.plan.plan_id, len(compiled.runnable))
    excluded = {compiled.plan.key(step) for step in inputs or {}}
    return optimize(compiled, annotate, options, threads=placement.threads,
                    estimate=estimate, excluded=excluded)


async def _estimates(client: Client, plan_id: str, jobs: int = 5000
                     ) -> Callable[[Job], float | None] | None:
    import statistics

    try:
        # this plan's steps and durations only, and only as many of its newest records
        # as it has jobs (the last run's): not every plan's last 5000 whole records
        got = await client.scheduler.obdask_metrics_jobs(
            limit=max(1, min(5000, jobs)), plan=plan_id, columns=["step", "duration_s"],
            as_columns=True)
    except Exception as exc:  # noqa: BLE001 - no metrics: batches bounded by size only
        # an older scheduler without plan=/columns= lands here too: size-bounded batches
        logger.debug("no job durations from the scheduler: %s", exc)
        return None
    # None: the scheduler runs without the metrics extension (obdask.metrics.enabled);
    # a list: one that answers a dict per record (before as_columns=)
    if isinstance(got, list):
        got = {"step": [r.get("step") for r in got],
               "duration_s": [r.get("duration_s") for r in got]}
    got = got or {}
    by_step = {step: float(seconds) for step, seconds in zip(
        got.get("step") or (), got.get("duration_s") or (), strict=False)
        if seconds is not None}
    if not by_step:
        return None
    median = statistics.median(by_step.values())
    return lambda job: by_step.get(job.spec.step_id, median)


def input_record(key: str, value: Any) -> dict[str, Any]:
    """A user's future as a job's dependency: ``{"step": "input:<key>", "input": value}``.

    Payloads read the outputs of dependencies that are obdask jobs; this one has
    none, so it orders the job after the user's work, and an executor of one's
    own (:func:`obdask.payloads.register_executor`) finds the value under ``"input"``.
    """
    return {"step": f"input:{key}", "key": key, "input": value}
