"""``obdask.submit``: a plan as Dask futures, without waiting for it.

``obdask.run`` blocks until the plan is done.  :func:`submit` prepares,
places and submits the same jobs (same keys, annotations, ledger and
records) and returns at once with :class:`PlanFutures`: one
``distributed.Future`` per runnable job, for ``distributed.wait``,
``as_completed`` and ``progress`` next to the user's own ``client.submit``
work, and ``run``, a :class:`concurrent.futures.Future` of the
:class:`~obdask.runner.RunResult`, which the client's event loop completes
(records written, plan id released) when the last job is over.

A step may wait for the user's own futures: ``inputs={"train": future}``
adds ``future`` as a dependency of step ``train``'s task; the job receives
``{"step": "input:<key>", "key": <key>, "input": <result>}`` among its
dependency records (:func:`obdask.runner.input_record`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from obdask.exceptions import ObdaskError
from obdask.plan import Plan

if TYPE_CHECKING:
    from distributed import Client, Future
    from tornado.platform.asyncio import AsyncIOLoop

    from obdask.runner import RunResult

logger = logging.getLogger(__name__)


@dataclass
class PlanFutures:
    """The futures of a submitted plan (see the module docstring).

    Iterating yields the job futures, so ``distributed.wait(list(planned))``
    and ``as_completed(planned.futures)`` work; ``distributed.progress(planned.futures)``
    shows a bar.
    """

    plan_id: str
    run_id: str
    jobs: dict[str, Future]
    run: concurrent.futures.Future = field(repr=False)

    @property
    def futures(self) -> list[Future]:
        """The job futures, in plan order."""
        return list(self.jobs.values())

    def __iter__(self) -> Iterator[Future]:
        return iter(self.jobs.values())

    def __len__(self) -> int:
        return len(self.jobs)

    def done(self) -> bool:
        """True once the run's records are written (or it failed to finish)."""
        return self.run.done()

    def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the run and return its :class:`~obdask.runner.RunResult`."""
        return self.run.result(timeout)


def submit(plan: Plan | str | os.PathLike[str], client: Client | None = None, *,
           inputs: Mapping[str, Future | list[Future]] | None = None,
           workspace: str | None = None, resume: bool = False, artifacts: str | None = None,
           records: str | None = None, priority: int = 0) -> PlanFutures:
    """Submit ``plan`` to ``client``'s cluster and return its futures at once.

    Parameters
    ----------
    plan
        A :class:`~obdask.plan.Plan` or a path to a plan file.
    client
        A synchronous ``distributed.Client``; default: the current default
        client.  (An embedded cluster would not outlive this call: start one with
        ``Client()`` first.)
    inputs
        Step id -> a future (or list of futures) of the user's own work that
        step waits for; see the module docstring.
    workspace, resume, artifacts, records, priority
        As for :func:`obdask.run`.

    Raises
    ------
    ObdaskError
        No client; an asynchronous client (``await obdask.run(plan, client)``
        there); ``inputs`` naming a step the plan does not have.
    """
    from obdask.runner import _finish, _start

    if not isinstance(plan, Plan):
        plan = Plan.from_file(plan)
    if client is None:
        from distributed import default_client

        try:
            client = default_client()
        except ValueError:
            raise ObdaskError("obdask.submit needs a cluster: pass client= or create a "
                              "distributed.Client() first") from None
    if client.asynchronous:
        raise ObdaskError("obdask.submit takes a synchronous client; with an asynchronous "
                          "one use 'await obdask.run(plan, client)'")
    wanted = _inputs(plan, inputs)
    running = client.sync(_start, client, plan, workspace=workspace, resume=resume,
                          artifacts=artifacts, records=records, priority=priority,
                          inputs=wanted, optimized=False)  # one future per job
    jobs = {key.split("::", 1)[1]: f for key, f in running.futures.items()}
    loop = cast("AsyncIOLoop", client.loop)  # a running client's loop is tornado's asyncio one
    run = asyncio.run_coroutine_threadsafe(_finish(client, running, None), loop.asyncio_loop)
    return PlanFutures(plan_id=plan.plan_id, run_id=running.ctx.run_id, jobs=jobs, run=run)


def _inputs(plan: Plan, inputs: Mapping[str, Any] | None) -> dict[str, list[Any]]:
    steps = {s.id for s in plan.steps}
    wanted: dict[str, list[Any]] = {}
    for step, given in (inputs or {}).items():
        if step not in steps:
            raise ObdaskError(f"inputs: no step {step!r} in plan {plan.plan_id!r} (steps: "
                              f"{', '.join(sorted(steps)[:10])})")
        wanted[step] = list(given) if isinstance(given, (list, tuple)) else [given]
    return wanted
