"""Graph optimisations between compile and submit: chain fusion and batching.

A Dask task costs the scheduler, the worker and the client about as much as a
``@cmd:true`` job itself, so fewer tasks run a plan faster.  This pass groups
the runnable jobs of a compiled plan into **units**, each one Dask task:

* ``job``: one job, as before.
* ``chain``: a linear chain ``a -> b -> c`` (each link's only runnable dependency
  is the link before it, and that link's only runnable dependent is it), with
  identical annotations (resources, lane, worker routes, retries) and one kind
  family (no model jobs), run in order on one worker.  The task's Dask key is the
  chain's last job's key, so dependents outside the chain refer to it unchanged.
  A failing link stops the chain: later links are skipped as dependents of a
  failed job are (``dependency X failed``), and so are the chain's dependents.
* ``batch``: jobs with the same runnable dependencies and the same runnable
  dependents (independent jobs, or the middle of a fan-out ``a -> b1..bn -> c``)
  and identical annotations: the batch waits for what each of them waited for,
  and whatever waits for one of them waits for all, so a batch delays nobody (no
  false dependency).  At most ``obdask.optimize.batch-size`` per batch and, where
  earlier jobs of the plan give an expected duration, at most
  ``obdask.optimize.batch-duration`` of it; batches are also kept small enough
  that every worker thread gets about two.  A failing job does not fail its
  batch-mates; when the batch has dependents, its task fails once all its jobs
  have run, so they are skipped (``dependency X failed``) as before.

Every job keeps its own record, ledger entry, timeout and retries: the unit's
task function (:func:`obdask.execute.run_unit`) retries a failing job in place
up to its own ``retries``, and a unit re-run after its worker died replays the
jobs the ledger already holds instead of running them again.  Metadata, resumed
and deduplicated jobs are never units: they complete at compile time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from obdask import config
from obdask.compile import CompiledPlan, Job

logger = logging.getLogger(__name__)

#: Kinds a chain or batch may hold: jobs that run a local process on the worker.
LOCAL_KINDS = frozenset({"cmd", "test", "apply"})

Annotate = Callable[[Job], dict[str, Any]]
Estimate = Callable[[Job], "float | None"]


@dataclass
class Unit:
    """One Dask task: a single job, a fused chain or a batch (see module docstring)."""

    kind: str
    jobs: list[Job]
    #: a batch with dependents: its task fails after its jobs ran if one of them failed
    gates: bool = False

    @property
    def anchor(self) -> Job:
        """The job whose Dask key the task takes: a chain's last link, else the first."""
        return self.jobs[-1] if self.kind == "chain" else self.jobs[0]

    @property
    def key(self) -> str:
        return self.anchor.key

    @property
    def head(self) -> Job:
        """The job whose dependencies are the task's dependencies."""
        return self.jobs[0]


@dataclass
class UnitBatch:
    """Units submitted together in one graph, sharing one set of annotations."""

    annotations: dict[str, Any]
    units: list[Unit] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    """The ``obdask.optimize.*`` settings of one run."""

    fuse: bool = True
    batch: bool = True
    batch_size: int = 64
    batch_duration: float = 2.0

    @classmethod
    def from_config(cls, enabled: bool = True) -> Options:
        """Options from config; ``enabled=False`` turns both optimisations off."""
        return cls(fuse=enabled and config.get_bool("optimize.fuse"),
                   batch=enabled and config.get_bool("optimize.batch"),
                   batch_size=config.get_int("optimize.batch-size", minimum=1),
                   batch_duration=config.get_seconds("optimize.batch-duration"))


def _signature(ann: dict[str, Any]) -> str:
    return _SIGNATURE_JSON.encode(ann)


# json.dumps(ann, sort_keys=True, default=str) builds an encoder a call: one, the same text
_SIGNATURE_JSON = json.JSONEncoder(sort_keys=True, default=str)


def optimize(compiled: CompiledPlan, annotate: Annotate, options: Options | None = None, *,
             threads: int | None = None, estimate: Estimate | None = None,
             excluded: Iterable[str] = ()) -> list[Unit]:
    """Group ``compiled``'s runnable jobs into units, in dependency order.

    Parameters
    ----------
    annotate
        The Dask annotations of a job as ``run`` submits it; only jobs with
        identical annotations share a unit.
    threads
        Worker threads of the cluster (None: unknown); bounds batch size so
        that each thread gets about two batches.
    estimate
        Expected seconds of a job (None: unknown, counts as nothing).
    excluded
        Job keys that stay single (e.g. steps waiting for a user's futures).
    """
    options = options or Options.from_config()
    jobs = compiled.runnable
    runnable = {j.key: j for j in jobs}
    deps = {j.key: [d for d in dict.fromkeys(j.spec.deps) if d in runnable] for j in jobs}
    dependents: dict[str, list[str]] = {k: [] for k in runnable}
    for key, ds in deps.items():
        for d in ds:
            dependents[d].append(key)
    sig = {j.key: _signature(annotate(j)) for j in jobs}
    single = set(excluded)

    def local(job: Job) -> bool:
        return job.spec.kind in LOCAL_KINDS and job.key not in single

    def links(a: Job, b: Job) -> bool:
        return (deps[b.key] == [a.key] and dependents[a.key] == [b.key] and local(a)
                and local(b) and sig[a.key] == sig[b.key] and a.spec.checkout == b.spec.checkout)

    placed: set[str] = set()
    units: list[Unit] = []
    for job in jobs:  # topological order: a chain is found from its head
        key = job.key
        if key in placed:
            continue
        chain = [job]
        while options.fuse and len(dependents[key]) == 1:
            nxt = runnable[dependents[key][0]]
            if not links(chain[-1], nxt):
                break
            chain.append(nxt)
            placed.add(key)
            key = nxt.key
        placed.add(key)
        units.append(Unit("chain" if len(chain) > 1 else "job", chain))
    if options.batch:
        units = _batched(units, deps, dependents, sig, local, options, threads, estimate)
    return units


def _batched(units: list[Unit], deps: dict[str, list[str]], dependents: dict[str, list[str]],
             sig: dict[str, str], local: Callable[[Job], bool], options: Options,
             threads: int | None, estimate: Estimate | None) -> list[Unit]:
    """Group single jobs of one signature, with the same dependencies and the same
    dependents, into batches (module docstring)."""
    groups: dict[tuple[str, frozenset[str], frozenset[str]], list[Job]] = {}
    for unit in units:
        job = unit.head
        if unit.kind == "job" and local(job):
            shared = (sig[job.key], frozenset(deps[job.key]), frozenset(dependents[job.key]))
            groups.setdefault(shared, []).append(job)
    anchors: dict[str, Unit] = {}

    def batch_of(jobs: list[Job]) -> Unit:
        if len(jobs) == 1:
            return Unit("job", jobs)
        return Unit("batch", jobs, gates=bool(dependents[jobs[0].key]))

    for members in groups.values():
        size = options.batch_size
        if threads:  # every thread gets work: at least two batches each
            size = min(size, max(1, math.ceil(len(members) / (2 * threads))))
        current: list[Job] = []
        spent = 0.0
        for job in members:
            cost = (estimate(job) if estimate else None) or 0.0
            if current and (len(current) >= size or spent + cost > options.batch_duration):
                anchors[current[0].key] = batch_of(current)
                current, spent = [], 0.0
            current.append(job)
            spent += cost
        if current:
            anchors[current[0].key] = batch_of(current)
    inside = {j.key for u in anchors.values() for j in u.jobs[1:]}
    return [anchors.get(u.key, u) for u in units if u.key not in inside]


def unit_batches(units: list[Unit], annotate: Annotate) -> list[UnitBatch]:
    """Group units into graphs of identical annotations (see :func:`obdask.compile.batches`).

    A unit's depth is the largest depth of the units it depends on, plus one
    where their annotations differ: submitting by depth submits a dependency
    before (or with) its dependents.
    """
    unit_of = {j.key: u for u in units for j in u.jobs}
    depth: dict[str, int] = {}
    sigs: dict[str, str] = {}
    groups: dict[tuple[int, str], UnitBatch] = {}
    for unit in units:  # dependency order
        ann = unit_annotations(unit, annotate)
        s = sigs[unit.key] = _signature(ann)
        d = 0
        for dep in unit.head.spec.deps:
            if dep in unit_of:
                other = unit_of[dep].key
                d = max(d, depth[other] + (sigs[other] != s))
        depth[unit.key] = d
        groups.setdefault((d, s), UnitBatch(ann)).units.append(unit)
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])]


def unit_annotations(unit: Unit, annotate: Annotate) -> dict[str, Any]:
    """A unit's Dask annotations: its jobs', less ``retries`` (retried per job inside)."""
    ann = annotate(unit.anchor)
    if unit.kind != "job":
        ann.pop("retries", None)
    return ann


def describe(units: list[Unit]) -> dict[str, Any]:
    """What ``obdask explain`` shows: the fused chains and the batches, by job key."""
    return {"tasks": len(units),
            "jobs": sum(len(u.jobs) for u in units),
            "fused": [[j.key for j in u.jobs] for u in units if u.kind == "chain"],
            "batched": [[j.key for j in u.jobs] for u in units if u.kind == "batch"]}
