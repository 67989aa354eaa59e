"""Compile a plan into Dask tasks with per-key annotations (no cluster needed).

Every runnable step becomes one job whose key is the global job id
``{plan_id}::{step_id}``; its dependencies are the step's ``deps``.  Each job
is one Dask task unless :mod:`obdask.optimize` fuses it into a chain or a batch.
Steps already done (``- [x]``), metadata payloads (``@doc:``, ``@url:``,
``@git:``, ``@gh:``), resumed and deduplicated steps complete here, at
compile time: they never become tasks and their dependents do not wait.

Annotations (resources, retries, priority, worker affinity) differ per key,
while Dask applies annotations per submitted graph, so
:func:`obdask.optimize.unit_batches` groups tasks with identical annotations
into as few graphs as possible, each submitted whole.  The scheduler
therefore holds each key's restrictions directly; no graph optimisation can
drop them.  Chain fusion and batching (:mod:`obdask.optimize`) only group jobs
whose annotations are identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from obdask.keys import dask_key_of
from obdask.plan import Payload, Plan, Step, topological_order

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to run one job; shipped inside its task."""

    key: str
    plan_id: str
    step_id: str
    lane: int
    payload: Payload
    kind: str = "cmd"  # see job_kind; decides the executor (obdask.payloads)
    deps: tuple[str, ...] = ()
    timeout: float | None = None
    dedupe: str | None = None
    model: str | None = None
    localities: tuple[str, ...] = ()
    checkout: str | None = None
    fingerprint: str = ""
    staged: str | None = None  # sha1 of the @file: content the client put in the store
    network: bool = False  # the step's network=true: its @cmd: sandbox shares the network

    @property
    def dask_key(self) -> tuple[str, str]:
        """The job's Dask key: ``(plan group, key)``, see :mod:`obdask.keys`."""
        return dask_key_of(self.key)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        # client.get tokenizes every task's arguments; the generic dataclass path
        # (normalising each field, pickling the payload) was a quarter of the client's
        # CPU for a 500-job plan.  The key and the fingerprint identify a spec.
        return ("obdask.JobSpec", self.key, self.fingerprint, self.timeout, self.checkout,
                self.staged, self.localities)


@dataclass
class Job:
    """A compiled step: its spec, annotations and compile-time outcome."""

    spec: JobSpec
    step: Step
    resources: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    status: str | None = None  # set when the job completes at compile time
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def runnable(self) -> bool:
        return self.status is None


@dataclass
class CompiledPlan:
    """Jobs in dependency order, plus the plan they came from."""

    plan: Plan
    jobs: list[Job]

    @property
    def runnable(self) -> list[Job]:
        return [j for j in self.jobs if j.runnable]

    def explain(self) -> list[dict[str, Any]]:
        """One plain dict per job: what ``obdask explain`` prints."""
        return [
            {
                "key": j.key,
                "kind": j.spec.kind,
                "lane": j.spec.lane,
                "deps": list(j.spec.deps),
                "payload": j.spec.payload.raw,
                "resources": j.resources,
                "retries": j.retries,
                "timeout": j.spec.timeout,
                "dedupe": j.spec.dedupe,
                "model": j.spec.model,
                "locality": list(j.spec.localities),
                "checkout": j.spec.checkout,
                "action": j.status or "run",
            }
            for j in self.jobs
        ]


#: The job kinds of plans; :mod:`obdask.payloads` maps each runnable kind to its executor.
KINDS = ("cmd", "apply", "test", "model", "metadata")


def job_kind(step: Step) -> str:
    """The kind of job ``step`` compiles to, decided once, here.

    ``model`` for a task for a language model (a bare ``@file:`` spec, or an
    ``@doc:LLM_TASK`` step of a plan that opted in), ``metadata`` for a payload
    that completes at compile time, else ``cmd``, ``apply`` or ``test``.
    """
    if step.is_model_task:
        return "model"
    if step.is_metadata:
        return "metadata"
    payload = step.payload
    if payload.prefix == "cmd":
        return "cmd"
    if payload.prefix == "file":
        return "apply" if payload.apply else "test"
    return "metadata"


def fingerprint(step: Step) -> str:
    """Hash of what a step does: a resumed record only counts if it is unchanged."""
    what = [step.payload.raw, sorted(step.deps), step.dedupe, step.lane, step.resources,
            step.model]
    if step.network:  # only then: fingerprints of existing plans stay as they were
        what.append("network")
    blob = _FINGERPRINT_JSON.encode(what)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# json.dumps(what, sort_keys=True) builds an encoder a call; one encoder, the same text
_FINGERPRINT_JSON = json.JSONEncoder(sort_keys=True)


def checkout_of(step: Step, plan: Plan, by_id: Mapping[str, Step] | None = None) -> str | None:
    """The ``git:<url>@<rev>`` a step runs in: its ``locality=``, an ``@git:``
    dependency, or the plan's ``workspace=git:...``; None for the plain workspace."""
    if step.locality and step.locality.startswith("git:"):
        return step.locality
    by_id = by_id if by_id is not None else plan.steps_by_id
    for dep in step.deps:
        payload = by_id[dep].payload
        if payload.prefix == "git":
            return f"git:{payload.body}"
    if plan.workspace and plan.workspace.startswith("git:"):
        return plan.workspace
    return None


def compile_plan(
    plan: Plan,
    *,
    completed: Mapping[str, dict[str, Any]] | None = None,
    deduplicated: Iterable[str] = (),
    default_retries: int = 0,
    default_timeout: float | None = None,
    resources_for: Callable[[Step], dict[str, float]] | None = None,
    localities_for: Callable[[Step], list[str]] | None = None,
    staged: Mapping[str, str] | None = None,
) -> CompiledPlan:
    """Turn a validated plan into jobs.

    Parameters
    ----------
    completed
        Step id -> record of an earlier run (``--resume``); used only when the
        recorded fingerprint matches the step.
    deduplicated
        Step ids whose dedupe key already has an artifact.
    resources_for
        Placement policy: the Dask resources a step needs (default: its own
        ``resources=``).
    localities_for
        Keys a worker can be warm for (checkouts, models); default none.
    staged
        Step id -> sha1 of its ``@file:`` content staged in the artifact store.
    """
    completed = completed or {}
    deduplicated = set(deduplicated)
    resources_for = resources_for or (lambda step: dict(step.resources))
    jobs: list[Job] = []
    by_id = plan.steps_by_id
    for step in topological_order(plan.steps):
        fp = fingerprint(step)
        checkout = checkout_of(step, plan, by_id)
        localities = tuple(localities_for(step)) if localities_for else ()
        if checkout and checkout not in localities:
            localities = (checkout, *localities)
        spec = JobSpec(
            key=plan.key(step.id), plan_id=plan.plan_id, step_id=step.id, lane=step.lane,
            payload=step.payload, kind=job_kind(step), deps=tuple(plan.key(d) for d in step.deps),
            # Model calls use obdask.llm.timeout unless the step sets its own.
            timeout=step.timeout if step.timeout is not None else (
                None if step.is_model_task else default_timeout),
            dedupe=step.dedupe_key, model=step.model, localities=localities,
            checkout=checkout, fingerprint=fp, staged=(staged or {}).get(step.id),
            network=step.network,
        )
        job = Job(spec=spec, step=step,
                  retries=step.retries if step.retries is not None else default_retries)
        previous = completed.get(step.id)
        if step.done:
            job.status = "done-at-compile"
            job.record = {"reason": "marked [x] in the plan"}
        elif step.is_metadata:
            job.status = "done-at-compile"
            job.record = {"metadata": {"kind": step.payload.prefix, "ref": step.payload.body}}
        elif previous is not None and previous.get("fingerprint") == fp:
            job.status = "resumed"
            job.record = {"resumed_from": previous.get("run_id"),
                          "artifacts": previous.get("artifacts", {})}
        elif step.id in deduplicated:
            job.status = "deduplicated"
            job.record = {"dedupe": step.dedupe_key}
        else:
            job.resources = resources_for(step)
        jobs.append(job)
    return CompiledPlan(plan=plan, jobs=jobs)


def annotations(job: Job, priority: int = 0, workers: list[str] | None = None,
                allow_other_workers: bool | None = None) -> dict[str, Any]:
    """Dask annotations of a job, in the keyword form of ``Client.get``."""
    ann: dict[str, Any] = {}
    if job.resources:
        ann["resources"] = job.resources
    if job.retries:
        ann["retries"] = job.retries
    if priority:
        ann["priority"] = priority
    if workers:
        ann["workers"] = workers
        ann["allow_other_workers"] = bool(allow_other_workers)
    return ann
