"""Wait for a submitted run and account for it: progress, worker events, the summary.

:func:`wait_for_tasks` waits for every task (progress counts jobs, not tasks);
:func:`subscribe_events` gathers the run's worker events as the scheduler publishes
them; :func:`summarize` makes the summary written beside the records.  When the
scheduler goes away mid-run (:func:`scheduler_lost`), :func:`record_interrupted`
writes what the ledger knows and raises :class:`~obdask.exceptions.SchedulerLost`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from obdask.compile import CompiledPlan
from obdask.context import RunContext
from obdask.exceptions import SchedulerLost
from obdask.plan import Plan
from obdask.result import RunResult

if TYPE_CHECKING:
    from distributed import Client, Future

Progress = Callable[[int, int], None]


async def wait_for_tasks(client: Client, futures: dict[str, Future],
                         progress: Progress | None) -> None:
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


def subscribe_events(client: Client, run_id: str) -> dict[str, list[dict[str, Any]]]:
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


def unsubscribe_events(client: Client, run_id: str) -> None:
    from obdask.execute import EVENT_TOPIC

    runs = client.__dict__.get("_obdask_event_runs", {})
    runs.pop(run_id, None)
    if not runs:
        client.unsubscribe_topic(EVENT_TOPIC)


def scheduler_lost(client: Client, exc: BaseException) -> bool:
    """Whether ``exc`` means the client lost its scheduler (not a job's failure)."""
    from distributed.client import FuturesCancelledError
    from distributed.comm.core import CommClosedError

    if "scheduler-connection-lost" in str(exc):
        return True
    lost = isinstance(exc, (FuturesCancelledError, CommClosedError, asyncio.CancelledError,
                            OSError, TimeoutError))
    return lost and client.status not in ("running", "connecting", "newly-created")


async def record_interrupted(client: Client, plan: Plan, compiled: CompiledPlan,
                              ctx: RunContext, started: float, exc: BaseException) -> None:
    """Write what is known after the scheduler went away, then raise SchedulerLost.

    Workers write a job's ledger entry when it completes, so the ledger knows
    every job that finished, whatever the client saw.
    """
    def known() -> list[dict[str, Any]]:
        outcomes = []
        ledger = ctx.records.ledger_many(j.spec.step_id for j in compiled.jobs if j.runnable)
        for job in compiled.jobs:
            base = {"key": job.key, "id": job.spec.step_id, "step": job.spec.step_id,
                    "run_id": ctx.run_id, "plan": ctx.plan_id,
                    "fingerprint": job.spec.fingerprint}
            if not job.runnable:
                outcomes.append({**base, "status": job.status, **job.record})
                continue
            done = ledger[job.spec.step_id]
            outcomes.append({**done, **base} if done else {
                **base, "status": "interrupted",
                "error": f"job {job.key}: not known to have finished (the scheduler was lost)"})
        return outcomes

    outcomes = await asyncio.to_thread(known)
    duration = time.time() - started
    summary = summarize(plan, ctx, outcomes, duration)
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


def summarize(plan: Plan, ctx: RunContext, outcomes: list[dict[str, Any]],
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
