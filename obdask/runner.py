"""Run a plan on a Dask cluster from a client: ``obdask.run``.

The runner resolves stores and workspace, compiles the plan, submits the
tasks (one graph per annotation batch), waits, and turns futures and worker
events into one record per job, written durably through fsspec.  It works
with any ``distributed.Client``, synchronous or asynchronous, or starts an
embedded ``LocalCluster`` when none is given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from obdask import config, settings
from obdask.artifacts import ArtifactStore
from obdask.collect import collect
from obdask.compile import CompiledPlan, Job, annotations, compile_plan
from obdask.context import CommandPolicy, RunContext
from obdask.exceptions import ObdaskError, PlacementError, PlanError, SchedulerLost
from obdask.optimize import Options, Unit, optimize, unit_annotations, unit_batches
from obdask.placement import Placement
from obdask.plan import Plan
from obdask.records import RunStore, new_run_id
from obdask.runlock import RunLock

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client, Future

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
COLUMNS = ["id", "key", "status", "worker", "attempts", "exit_code", "duration_s",
           "error", "warm"]


@dataclass
class RunResult:
    """Outcome of one run: ``ok``, per-job ``records`` and a pandas ``frame``."""

    plan_id: str
    run_id: str
    records: list[dict[str, Any]]
    location: str
    duration_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: ArtifactStore | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when no job failed, was skipped or was cut off (scheduler lost)."""
        return all(r["status"] not in ("failed", "skipped", "interrupted")
                   for r in self.records)

    @property
    def frame(self) -> pd.DataFrame:
        """One row per job (columns: id, key, status, worker, attempts, ...).

        Integer fields (``exit_code``, ``attempts``, byte counts, tokens) are
        pandas' nullable ``Int64``: a job without one has ``<NA>``, not a float NaN.
        Outputs are sha1 keys here; :meth:`to_frame` or :meth:`output` load them.
        """
        return self.to_frame()

    def to_frame(self, outputs: Iterable[str] = ()) -> pd.DataFrame:
        """:attr:`frame`, with the named outputs loaded as text in place of their keys.

        Parameters
        ----------
        outputs
            Any of ``"stdout"``, ``"stderr"``, ``"reply"``, ``"diff"``; a job
            without that output (or with an empty one) gets ``None``.
        """
        import pandas as pd

        from obdask.outputs import INTEGER_COLUMNS, check_stream, output_text

        frame = pd.DataFrame.from_records(self.records)
        for column in COLUMNS:
            if column not in frame:
                frame[column] = None
        for column in INTEGER_COLUMNS:
            if column in frame:
                frame[column] = pd.array(
                    [None if v is None or v != v else int(v) for v in frame[column]],
                    dtype="Int64")
        for which in outputs:
            check_stream(which)
            store = self._artifacts()
            frame[which] = [output_text(r, which, store) if r.get(which) else None
                            for r in self.records]
        return frame.set_index("id", drop=False)

    def output(self, job: str, which: str = "stdout") -> str | None:
        """The text a job wrote to ``which`` (stdout, stderr, reply, diff); None if empty.

        Raises
        ------
        ObdaskError
            No such job in this run, or the job has no such output (a ``@cmd``
            job has no ``reply``).
        """
        from obdask.outputs import check_stream, find_record, output_text

        check_stream(which)
        record = find_record(self.records, job, f"run {self.run_id} of plan {self.plan_id!r}")
        return output_text(record, which, self._artifacts())

    def _artifacts(self) -> ArtifactStore:
        if self.artifacts is None:  # a result built by hand: the store the summary names
            url = self.summary.get("artifacts")
            if not url:
                raise ObdaskError(f"run {self.run_id}: no artifact store is known; build the "
                                  "RunResult with artifacts= or a summary with 'artifacts'")
            self.artifacts = ArtifactStore(url, config.storage_options(url))
        return self.artifacts

    def to_json(self) -> dict[str, Any]:
        """The ``obdask run --json`` object."""
        keep = ("id", "key", "status", "worker", "exit_code", "duration_s", "error")
        return {"ok": self.ok, "plan": self.plan_id, "run_id": self.run_id,
                "records": self.location,
                "workers_lost": self.summary.get("workers_lost", []),
                "interrupted": self.summary.get("interrupted"),
                "jobs": [{k: r.get(k) for k in keep} for r in self.records]}


def _store_url(kind: str, explicit: str | None, plan: Plan) -> str:
    url = config.get_str(f"store.{kind}", explicit)
    return url or os.path.join(plan.folder, ".obdask", kind)


def resolve_workspace(plan: Plan, workspace: str | None) -> str:
    """Workspace folder: argument, plan's ``workspace=``, config, or the plan's folder."""
    chosen = (os.fspath(workspace) if workspace else None) or plan.workspace or \
        config.get_str("workspace")
    if not chosen:
        return plan.folder
    if chosen.startswith("git:"):
        return chosen  # each job runs in its worker's checkout (obdask.workspace)
    path = chosen if os.path.isabs(chosen) else os.path.join(plan.folder, chosen)
    if not os.path.isdir(path):
        raise PlanError(f"{plan.path or plan.plan_id}: workspace {path} is not a folder")
    return path


def prepare(plan: Plan, *, workspace: str | None = None, resume: bool = False,
            artifacts: str | None = None, records: str | None = None,
            run_id: str | None = None) -> tuple[CompiledPlan, RunContext]:
    """Resolve stores, resume and dedupe state, and compile (no cluster needed).

    Resources, lanes and routes are left to the placement phase
    (:func:`obdask.placement.place`).
    """
    settings.check()  # every bad setting, naming its key, before anything is read or run
    from obdask.confine import check_plan

    check_plan(plan, resolve_workspace(plan, workspace))  # no file or workspace escapes
    storage_options = dict(config.get("storage-options") or {})
    art_url = _store_url("artifacts", artifacts, plan)
    rec_url = _store_url("records", records, plan)
    default_folder = os.path.join(plan.folder, ".obdask")
    if any(os.path.dirname(u) == default_folder for u in (art_url, rec_url)):
        from obdask.outputs import ensure_gitignore

        ensure_gitignore(default_folder)  # not the user's files: git should not list them
    art = ArtifactStore(art_url, config.storage_options(art_url, storage_options))
    art.check_writable()  # before any job: every one would fail on it
    store = RunStore(rec_url, plan.plan_id, run_id or new_run_id(),
                     config.storage_options(rec_url, storage_options))
    completed = store.completed_before([s.id for s in plan.steps]) if resume else {}
    dedupe = {s.dedupe_key: s.id for s in plan.steps if s.dedupe_key and not s.done}
    deduplicated = [dedupe[k] for k in art.done_keys(dedupe)]
    compiled = compile_plan(
        plan, completed=completed, deduplicated=deduplicated, staged=stage_files(plan, art),
        default_retries=config.get_int("run.retries"),
        default_timeout=config.get_seconds("run.timeout"),
        localities_for=_localities_policy(plan),
    )
    has_models = any(step.is_model_task for step in plan.steps)
    endpoints, models = RunContext.llm_from_config() if has_models else ((), {})
    ctx = RunContext(run_id=store.run_id, plan_id=plan.plan_id,
                     workspace=resolve_workspace(plan, workspace), plan_folder=plan.folder,
                     artifacts=art, records=store, command=CommandPolicy.from_config(),
                     storage_options=storage_options, llm_endpoints=endpoints,
                     llm_models=models)
    return compiled, ctx


def stage_files(plan: Plan, store: ArtifactStore) -> dict[str, str]:
    """Put plan-local ``@file:`` payloads in the artifact store for remote workers.

    ``obdask.store.stage-files``: ``auto`` stages when the artifact store is not
    on local disk (a real cluster whose workers cannot see the plan's folder).
    Missing files are left alone: their jobs fail with a clear error as usual.
    """
    mode = config.get("store.stage-files")
    if mode is False or (mode == "auto" and store.is_local):
        return {}
    staged = {}
    for step in plan.steps:
        body = step.payload.body
        if step.payload.prefix != "file" or step.done or "://" in body or \
                body.startswith("job:"):
            continue
        path = body if os.path.isabs(body) else os.path.join(plan.folder, body)
        try:
            with open(path, "rb") as f:
                staged[step.id] = store.put(f.read())
        except OSError:
            continue
    return staged


def _localities_policy(plan: Plan):
    from obdask.placement import locality_keys

    if not config.get("placement.locality"):
        return None
    steps_by_id = plan.steps_by_id
    files = bool(config.get("placement.file-locality"))
    return lambda step: locality_keys(step, steps_by_id, base=plan.folder, files=files)


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


async def _start(client: Client, plan: Plan, *, workspace: str | None, resume: bool,
                 artifacts: str | None, records: str | None, priority: int,
                 inputs: dict[str, list[Future]] | None = None, optimized: bool = True
                 ) -> _Running:
    """Prepare, place and submit: the job futures of a run that goes on without us.

    ``optimized=False`` keeps one task per job (``obdask.submit``: one future per job).
    """
    started = time.time()
    await _install_plugins(client, plan)
    # Stores are read and written through fsspec, which blocks: never on the event loop.
    compiled, ctx = await asyncio.to_thread(
        prepare, plan, workspace=workspace, resume=resume, artifacts=artifacts, records=records)
    # One run of a plan at a time per record store, even on separate embedded clusters.
    lock = RunLock(ctx.records)
    if await asyncio.to_thread(lock.acquire, config.get_seconds("run.busy-plan-wait")):
        compiled, ctx = await asyncio.to_thread(  # what the earlier run completed counts
            prepare, plan, workspace=workspace, resume=resume, artifacts=artifacts,
            records=records, run_id=ctx.run_id)
    try:
        placement = await place_on(client, compiled)
        units = await units_on(client, compiled, placement, priority, inputs, optimized)
        owner = await _claim_plan_id(client, plan, ctx)
    except BaseException:
        await asyncio.to_thread(lock.release)
        raise
    try:
        await _wait_keys_free(client, [j.key for j in compiled.runnable], plan)
        await asyncio.to_thread(_mark_started, ctx, plan, compiled)
        events = _subscribe_events(client, ctx.run_id)
    except BaseException:
        await _release_plan_id(client, plan, owner)
        await asyncio.to_thread(lock.release)
        raise
    try:
        futures, span_id = _submit(client, units, ctx, priority, placement.routes, inputs)
    except BaseException:
        _unsubscribe_events(client, ctx.run_id)
        await _release_plan_id(client, plan, owner)
        await asyncio.to_thread(lock.release)
        raise
    return _Running(plan, compiled, ctx, futures, span_id, owner, events, started, lock,
                    {j.key: u for u in units if u.kind != "job" for j in u.jobs})


async def _finish(client: Client, running: _Running, progress: Progress | None) -> RunResult:
    """Wait for a started run, collect its records, write them: the :class:`RunResult`."""
    plan, ctx = running.plan, running.ctx
    try:
        try:
            await _wait(client, running.futures, progress)
            outcomes = await collect(client, running.compiled, running.futures, ctx,
                                     running.events, running.units)
            running.futures = {}
        except Exception as exc:
            if not _scheduler_lost(client, exc):
                raise
            await _record_interrupted(client, plan, running.compiled, ctx, running.started,
                                      exc)
        finally:
            _unsubscribe_events(client, ctx.run_id)
            await _release_plan_id(client, plan, running.owner)
        duration = time.time() - running.started
        summary = _summary(plan, ctx, outcomes, duration)
        summary["span"] = running.span_id
        location = await asyncio.to_thread(ctx.records.write_records, outcomes, summary)
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


async def _install_plugins(client: Client, plan: Plan) -> None:
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
                                localities_for=_localities_policy(plan))
        placement = place(compiled, ClusterView())

        def annotate(job: Job) -> dict[str, Any]:
            return job_annotations(job, placement.routes, priority)

        units = optimize(compiled, annotate)
        return _explained(compiled, placement, priority, units)
    return client.sync(_explain_on, client, plan, priority)


async def _explain_on(client: Client, plan: Plan, priority: int) -> dict[str, Any]:
    await _install_plugins(client, plan)
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


def _submit(client: Client, units: list[Unit], ctx: RunContext, priority: int,
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

    runnable = {j.key for u in units for j in u.jobs}
    futures: dict[str, Future] = {}
    routes = routes or {}

    def annotate(job: Job) -> dict[str, Any]:
        return job_annotations(job, routes, priority)

    def task(unit: Unit) -> Task:
        head = unit.head
        deps = [TaskRef(dask_key_of(d)) for d in head.spec.deps if d in runnable]
        deps += [Task(f"obdask-input-{head.key}-{i}", input_record, str(f.key), f)
                 for i, f in enumerate((inputs or {}).get(head.spec.step_id, ()))]
        key = unit.anchor.spec.dask_key
        if unit.kind == "job":
            return Task(key, run_job, head.spec, ctx, *deps)
        return Task(key, run_unit, unit.kind, tuple(j.spec for j in unit.jobs),
                    tuple(j.retries for j in unit.jobs), ctx, *deps)

    if not runnable:
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
        estimate = await _estimates(client, compiled.plan.plan_id)
    excluded = {compiled.plan.key(step) for step in inputs or {}}
    return optimize(compiled, annotate, options, threads=placement.threads,
                    estimate=estimate, excluded=excluded)


async def _estimates(client: Client, plan_id: str) -> Callable[[Job], float | None] | None:
    import statistics

    try:
        rows = await client.scheduler.obdask_metrics_jobs(limit=5000)
    except Exception as exc:  # noqa: BLE001 - no metrics: batches bounded by size only
        logger.debug("no job durations from the scheduler: %s", exc)
        return None
    # None: the scheduler runs without the metrics extension (obdask.metrics.enabled)
    by_step = {r["step"]: float(r["duration_s"]) for r in rows or ()
               if r.get("plan") == plan_id and r.get("duration_s") is not None}
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


async def _wait(client: Client, futures: dict[str, Future], progress: Progress | None) -> None:
    """Wait for every task; ``progress`` counts jobs (a fused or batched task holds several)."""
    from distributed import as_completed, wait

    total = len(futures)
    tasks: dict[Any, list[Future]] = {}
    for future in futures.values():
        tasks.setdefault(future.key, []).append(future)
    if progress is None or not total:
        # distributed.wait waits through the *default* client: with another client
        # current in this process (a notebook's, a test's), it blocked this loop.
        with client.as_current():
            await wait([same[0] for same in tasks.values()])
        return
    done = 0
    progress(0, total)
    async for future in as_completed([same[0] for same in tasks.values()], loop=client.loop):
        done += len(tasks[future.key])
        progress(done, total)


def _subscribe_events(client: Client, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """Collect this run's worker events as the scheduler publishes them.

    One topic handler per client fans out to every run in flight on it.
    """
    from obdask.execute import EVENT_TOPIC

    runs = client.__dict__.setdefault("_obdask_event_runs", {})
    received: dict[str, list[dict[str, Any]]] = {}
    runs[run_id] = received
    if len(runs) == 1:
        def handler(event: tuple[float, Any]) -> None:
            msg = event[1]
            if isinstance(msg, dict) and msg.get("run") in runs:
                runs[msg["run"]].setdefault(msg["key"], []).append(msg)

        client.subscribe_topic(EVENT_TOPIC, handler)
    return received


def _unsubscribe_events(client: Client, run_id: str) -> None:
    from obdask.execute import EVENT_TOPIC

    runs = client.__dict__.get("_obdask_event_runs", {})
    runs.pop(run_id, None)
    if not runs:
        client.unsubscribe_topic(EVENT_TOPIC)


def _scheduler_lost(client: Client, exc: BaseException) -> bool:
    """Whether ``exc`` means the client lost its scheduler (not a job's failure)."""
    from distributed.client import FuturesCancelledError
    from distributed.comm.core import CommClosedError

    if "scheduler-connection-lost" in str(exc):
        return True
    lost = isinstance(exc, (FuturesCancelledError, CommClosedError, asyncio.CancelledError,
                            OSError, TimeoutError))
    return lost and client.status not in ("running", "connecting", "newly-created")


async def _record_interrupted(client: Client, plan: Plan, compiled: CompiledPlan,
                              ctx: RunContext, started: float, exc: BaseException) -> None:
    """Write what is known after the scheduler went away, then raise SchedulerLost.

    Workers write a job's ledger entry when it completes, so the ledger knows
    every job that finished, whatever the client saw.
    """
    def known() -> list[dict[str, Any]]:
        outcomes = []
        for job in compiled.jobs:
            base = {"key": job.key, "id": job.spec.step_id, "step": job.spec.step_id,
                    "run_id": ctx.run_id, "plan": ctx.plan_id,
                    "fingerprint": job.spec.fingerprint}
            if not job.runnable:
                outcomes.append({**base, "status": job.status, **job.record})
                continue
            done = ctx.records.ledger_get(job.spec.step_id)
            outcomes.append({**done, **base} if done else {
                **base, "status": "interrupted",
                "error": f"job {job.key}: not known to have finished (the scheduler was lost)"})
        return outcomes

    outcomes = await asyncio.to_thread(known)
    duration = time.time() - started
    summary = _summary(plan, ctx, outcomes, duration)
    summary.update(ok=False, interrupted="scheduler lost")
    location = await asyncio.to_thread(ctx.records.write_records, outcomes, summary)
    result = RunResult(plan_id=plan.plan_id, run_id=ctx.run_id, records=outcomes,
                       location=location, duration_s=duration, summary=summary,
                       artifacts=ctx.artifacts)
    finished = sum(1 for r in outcomes if r["status"] == "done")
    raise SchedulerLost(
        f"plan {plan.plan_id!r}: the scheduler at {client.scheduler.address} was lost during "
        f"the run ({finished} of {len(outcomes)} jobs known done, records at {location}); "
        "restart the cluster and run again with --resume to finish the plan", result) from None


def _summary(plan: Plan, ctx: RunContext, outcomes: list[dict[str, Any]],
             duration: float) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in outcomes:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    warm = [r["warm"] for r in outcomes if r.get("warm") is not None]
    tokens: dict[str, dict[str, int]] = {}
    for r in outcomes:
        if r.get("status") == "done" and r.get("model") and not r.get("replayed"):
            used = tokens.setdefault(r["model"], {"prompt": 0, "output": 0, "calls": 0})
            used["prompt"] += int(r.get("prompt_eval_count") or 0)
            used["output"] += int(r.get("eval_count") or 0)
            used["calls"] += 1
    lost = sorted({w for r in outcomes for w in r.get("workers_lost", ())})
    return {"plan": plan.plan_id, "run_id": ctx.run_id, "workers_lost": lost, "ok": not (
        counts.get("failed") or counts.get("skipped")), "counts": counts,
        "duration_s": duration, "workspace": ctx.workspace,
        "warm_hit_rate": (sum(warm) / len(warm)) if warm else None, "tokens": tokens,
        "artifacts": ctx.artifacts.url}
