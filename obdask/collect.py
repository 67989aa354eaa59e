"""Turn a run's futures, worker events and attempt history into one record per job.

A Dask task may carry several jobs (a fused chain or a batch, see
:mod:`obdask.optimize`): its result holds every member's record, and a failed
unit's jobs are recorded as single jobs would be (``failed`` for the culprit,
``skipped`` with ``dependency X failed`` for the jobs after it).  Records always
count jobs, never tasks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from obdask.exceptions import ChainFailed, JobFailed
from obdask.redact import redact_obj

if TYPE_CHECKING:
    from distributed import Client, Future

    from obdask.compile import CompiledPlan, Job
    from obdask.context import RunContext
    from obdask.optimize import Unit

logger = logging.getLogger(__name__)


async def collect(client: Client, compiled: CompiledPlan, futures: dict[str, Future],
                  ctx: RunContext, received: dict[str, list[dict[str, Any]]] | None = None,
                  units: dict[str, Unit] | None = None) -> list[dict[str, Any]]:
    """One record per job of ``compiled`` (``futures`` and ``units`` by job key)."""
    units = units or {}
    jobs = {j.key: j for j in compiled.jobs}
    tasks: dict[Any, tuple[Future, str]] = {}  # one future per task, shared by its jobs
    for key, future in futures.items():
        tasks.setdefault(future.key, (future, key))
    finished = [f for f, _ in tasks.values() if f.status == "finished"]
    by_job: dict[str, dict[str, Any]] = {}
    for value in await client.gather(finished):
        for record in (value, *getattr(value, "members", ())):
            by_job[record["key"]] = dict(record)
    for future, key in tasks.values():
        if future.status == "finished":
            continue
        unit = units.get(key)
        if unit is None:
            job = jobs[key]
            by_job[job.key] = await _failure_record(job, future)
        else:
            for record in await _unit_failure(unit, future, ctx):
                by_job[record["key"]] = record
    # Events received while the run went on; the scheduler's own log of the topic
    # keeps only the last distributed.admin.low-level-log-length (1000) events.
    events = {**await _events(client, ctx.run_id), **(received or {})}
    tries = await client.scheduler.obdask_attempts_query(keys=list(futures)) \
        if futures else {}
    outcomes = []
    for job in compiled.jobs:
        if not job.runnable:
            record = {"key": job.key, "step": job.spec.step_id, "status": job.status,
                      "fingerprint": job.spec.fingerprint, **job.record}
        else:
            record = by_job[job.key]
        record.update(id=job.spec.step_id, run_id=ctx.run_id, plan=ctx.plan_id)
        task_key = units[job.key].key if job.key in units else job.key
        attempts(record, tries.get(task_key, []), events.get(job.key, []))
        outcomes.append(record)
    # the frame, the CLI and the records files; one call: the known secrets looked up once
    return redact_obj(outcomes)


def _base(job: Job) -> dict[str, Any]:
    return {"key": job.key, "step": job.spec.step_id, "fingerprint": job.spec.fingerprint}


async def _failure_record(job: Job, future: Future) -> dict[str, Any]:
    from distributed import KilledWorker

    from obdask.keys import job_id_of

    base = _base(job)
    if future.status == "cancelled":
        return {**base, "status": "failed", "error": f"job {job.key}: cancelled"}
    exc = await future.exception()
    if isinstance(exc, JobFailed):
        culprit = exc.record.get("key")
        if culprit and culprit != job.key:
            return {**base, "status": "skipped", "error": f"dependency {culprit} failed"}
        return {**exc.record, **base, "status": "failed"}
    if isinstance(exc, KilledWorker):
        culprit = getattr(exc, "task", None)
        culprit = job_id_of(culprit) or culprit
        if culprit and culprit != job.key:
            return {**base, "status": "skipped", "error": f"dependency {culprit} failed"}
        return {**base, "status": "failed",
                "worker": getattr(getattr(exc, "last_worker", None), "address", None),
                "error": f"job {job.key}: its worker died on every attempt ({exc})"}
    return {**base, "status": "failed", "error": f"job {job.key}: {type(exc).__name__}: {exc}"}


async def _unit_failure(unit: Unit, future: Future, ctx: RunContext) -> list[dict[str, Any]]:
    """The records of a unit whose task did not finish: what each of its jobs became.

    A chain's failing link is ``failed``, the links before it keep their records
    and those after it are ``skipped``; a failure upstream of the unit skips all of
    it.  When the task itself died (its worker lost on every attempt), the jobs
    the ledger holds as done stay done.
    """
    keys = [j.key for j in unit.jobs]
    if future.status != "cancelled":
        exc = await future.exception()
        if isinstance(exc, ChainFailed) and exc.record.get("key") in keys:
            known = {r["key"]: dict(r) for r in exc.done}
            known[exc.record["key"]] = {**exc.record, "status": "failed"}
            return _after_culprit(unit, known, exc.record["key"])
        if isinstance(exc, JobFailed) and exc.record.get("key") not in keys:
            culprit = exc.record.get("key")
            return [{**_base(j), "status": "skipped", "error": f"dependency {culprit} failed"}
                    for j in unit.jobs]
    single = await _failure_record(unit.anchor, future)
    if single["status"] == "skipped":  # a dependency outside the unit failed
        return [{**_base(j), "status": "skipped", "error": single["error"]} for j in unit.jobs]
    done = await asyncio.to_thread(ctx.records.ledger_many, [j.spec.step_id for j in unit.jobs])
    known = {j.key: {**r, "key": j.key} for j in unit.jobs
             if (r := done[j.spec.step_id]) is not None and r.get("status") == "done"}
    error = single.get("error", "").replace(f"job {unit.anchor.key}", "its task")
    culprit = next((k for k in keys if k not in known), None)
    if unit.kind == "batch":
        return [known.get(j.key) or {**_base(j), "status": "failed", "worker": single.get(
            "worker"), "error": f"job {j.key}: {error}"} for j in unit.jobs]
    if culprit is not None:
        known[culprit] = {**_base(unit.jobs[keys.index(culprit)]), "status": "failed",
                          "worker": single.get("worker"), "error": f"job {culprit}: {error}"}
        return _after_culprit(unit, known, culprit)
    return [known[k] for k in keys]


def _after_culprit(unit: Unit, known: dict[str, dict[str, Any]], culprit: str
                   ) -> list[dict[str, Any]]:
    return [known.get(j.key) or {**_base(j), "status": "skipped",
                                 "error": f"dependency {culprit} failed"} for j in unit.jobs]


async def _events(client: Client, run_id: str) -> dict[str, list[dict[str, Any]]]:
    from obdask.execute import EVENT_TOPIC

    by_key: dict[str, list[dict[str, Any]]] = {}
    for _, event in await client.get_events(EVENT_TOPIC):
        if isinstance(event, dict) and event.get("run") == run_id:
            by_key.setdefault(event["key"], []).append(event)
    return by_key


def attempts(record: dict[str, Any], tries: list[list[Any]],
             events: list[dict[str, Any]]) -> None:
    """Attempts (from the scheduler) and retry reasons (with the workers' errors).

    A job of a fused or batched task was retried in place (``tries_in_task``):
    those tries count too, with their reasons.
    """
    in_task = record.pop("tries_in_task", None)
    reasons_in_task = record.pop("retries_in_task", None) or []
    record["attempts"] = len(tries)
    errors: dict[str, str] = {e["worker"]: e.get("error") or "error" for e in events
                              if e["event"] == "failed"}
    reasons = describe(tries, errors) if not in_task else \
        [r for r in describe(tries, {}) if r.endswith(" lost")]
    lost = sorted({w for w, outcome in tries[:-1]
                   if outcome not in ("erred", "waiting") and w not in errors and w})
    if lost:
        record["workers_lost"] = lost
    if in_task:
        record["attempts"] = max(len(tries), 1) - 1 + in_task
        reasons = [*reasons, *reasons_in_task]
    if any(e["event"] == "replayed" for e in events):
        reasons.append("re-run after worker loss: result replayed from the ledger")
    if reasons:
        record["retries"] = reasons


def describe(tries: list[list[Any]], errors: dict[str, str]) -> list[str]:
    """Human reasons for every attempt but the last; ``errors`` maps worker -> error.

    Dask moves an erred task with retries left through ``released`` as it moves a
    lost worker's task, so an attempt whose worker reported the job's failure is
    a failure, whatever state it left ``processing`` for.
    """
    reasons = []
    for i, (worker, outcome) in enumerate(tries[:-1], start=1):
        if outcome in ("erred", "waiting") or worker in errors:
            reasons.append(f"attempt {i} failed on {worker}: {errors.get(worker, 'error')}")
        else:
            reasons.append(f"attempt {i}: worker {worker} lost")
    return reasons
