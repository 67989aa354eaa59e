"""Decide where steps may run: Dask resource requests, lanes and locality.

Everything here is pure (no cluster needed) except :func:`wait_for_placeable`
and :func:`ensure_placeable`, which read the scheduler's worker list.

Resource requests
    A model task asks for its role's ``GPU``/``VRAM`` (config
    ``obdask.placement.models.<role>``); ``resources=`` on the step overrides
    single keys (``GPU:0`` removes the request).  Non-model steps ask only for
    their explicit ``resources=``.

Lanes
    Workers advertise ``lane-N`` resources (see :mod:`obdask.resources`).  A
    job of lane L asks for ``lane-L: 1`` only when :func:`lanes_in_use` says
    some worker is restricted to some lanes, so plain clusters pay nothing.

Locality
    :func:`locality_of` names the git checkout a step works in, so the runner
    can prefer workers that reported a warm clone of it
    (:func:`obdask.placement.warm_workers`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import dask
from dask.utils import format_bytes

import obdask.config as config
from obdask.exceptions import ConfigError, PlacementError
from obdask.resources import (
    BYTE_RESOURCES,
    ENDPOINT_METRIC,
    LANE_PREFIX,
    get_max_lanes,
    model_key,
    worker_lanes,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: ``(job_key, step line or id, resources)`` as given to :func:`check_placeable`.
Job = tuple[str, Any, Mapping[str, float]]


class StepLike(Protocol):
    """The attributes of a plan step that placement reads."""

    id: str
    lane: int
    payload: Any  # str, or obdask.plan.Payload (its ``.raw`` is the text)
    deps: tuple[str, ...]
    resources: dict[str, float]
    model: str | None
    locality: str | None
    line: int

    @property
    def is_model_task(self) -> bool: ...


# --------------------------------------------------------------------- roles


def model_roles() -> dict[str, dict[str, Any]]:
    """Return ``obdask.placement.models`` as ``{role: {model, vram, gpu}}``."""
    roles = dask.config.get("obdask.placement.models", {}) or {}
    return {str(k): (dict(v) if isinstance(v, Mapping) else {"model": v}) for k, v in roles.items()}


def step_role(step: StepLike) -> str | None:
    """Model role of ``step``: its ``model=``, the default role for a model task, or None."""
    if step.model:
        return step.model
    if step.is_model_task:
        return str(config.get("placement.default-role"))
    return None


def role_spec(role: str, step: StepLike | None = None) -> dict[str, Any]:
    """Return the config of ``role``.

    Raises
    ------
    PlacementError
        The role is not configured; names the step and the known roles.
    """
    roles = model_roles()
    if role not in roles:
        where = f"step {step.id!r} (line {step.line}): " if step is not None else ""
        raise PlacementError(
            f"{where}unknown model role {role!r}; known roles: {', '.join(sorted(roles))}."
            " Use one of them in model= or add the role under obdask.placement.models"
        )
    return roles[role]


def role_resources(role: str, step: StepLike | None = None) -> dict[str, float]:
    """``GPU``/``VRAM`` a role needs (zero amounts are left out)."""
    spec = role_spec(role, step)
    out: dict[str, float] = {}
    try:
        gpu = float(spec.get("gpu") or 0)
        vram = float(dask.utils.parse_bytes(spec.get("vram") or 0))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"obdask.placement.models.{role}: bad gpu/vram in {spec!r}") from exc
    if gpu > 0:
        out["GPU"] = gpu
    if vram > 0:
        out["VRAM"] = vram
    return out


def model_name(step: StepLike) -> str | None:
    """Ollama model the step's role runs (``models.<role>.model``), or None."""
    role = step_role(step)
    if role is None:
        return None
    name = role_spec(role, step).get("model")
    return str(name) if name else None


# ----------------------------------------------------------- resources, lanes


def lanes_in_use(
    workers_info: Mapping[str, Mapping[str, Any]], max_lanes: int | None = None
) -> bool:
    """Whether jobs must request their lane.

    True when at least one worker offers some lanes but not all of
    ``lane-1 .. lane-{max-lanes}`` (it was started with ``--lanes``).
    Workers without any lane resource are treated as taking every lane, but
    cannot run lane requests: start them with the obdask preload or install
    the plugin (:func:`obdask.diagnostics.plugin.install`), which adds lanes.

    Parameters
    ----------
    workers_info : mapping
        ``client.scheduler_info()["workers"]``.
    """
    full = set(range(1, get_max_lanes(max_lanes) + 1))
    for info in workers_info.values():
        lanes = worker_lanes(info.get("resources") or {})
        if lanes and not full <= lanes:
            return True
    return False


def step_resources(step: StepLike, lanes_active: bool,
                   models_served_locally: bool = True) -> dict[str, float]:
    """Dask resources ``step`` needs.

    Parameters
    ----------
    step : StepLike
        A plan step (``resources=`` already parsed to floats).
    lanes_active : bool
        Result of :func:`lanes_in_use`; adds ``lane-<step.lane>: 1`` when true
        and the lane is 1 or more.
    models_served_locally : bool
        Whether some worker serves models from its own endpoint
        (:attr:`ClusterView.models_served_locally`).  Only then does a model
        task's role ``GPU``/``VRAM`` bind the *Dask worker*; a worker that calls an
        Ollama server over the network needs no GPU.  A non-model step that names
        ``model=`` always asks for that role's hardware.

    Returns
    -------
    dict
        Role needs overridden by explicit ``resources=``; keys whose amount is
        0 or less are dropped.  Empty for a plain step on a plain cluster.

    Raises
    ------
    PlacementError
        The step names a model role that is not configured.
    """
    role = step_role(step)
    out = role_resources(role, step) if role is not None else {}
    if not models_served_locally and step.is_model_task:
        # the model is called over the network: the Dask worker needs no GPU.  (A
        # non-model step naming model= asks for that role's hardware itself.)
        out = {}
    out.update({str(k): float(v) for k, v in (step.resources or {}).items()})
    out = {k: v for k, v in out.items() if v > 0}
    if lanes_active and step.lane is not None and int(step.lane) >= 1:
        out.setdefault(f"{LANE_PREFIX}{int(step.lane)}", 1.0)
    return out


# ------------------------------------------------------------- placeability


def _fmt(name: str, amount: float) -> str:
    if name in BYTE_RESOURCES:
        return format_bytes(int(amount))
    return f"{amount:g}"


def _supplies(offer: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(offer.get(k, 0) >= v for k, v in need.items())


def _unplaceable_reason(need: Mapping[str, float], offers: Mapping[str, Mapping]) -> str:
    """Explain why no worker in ``offers`` ({addr: resources}) supplies ``need``."""
    if not offers:
        return "the cluster has no workers"
    for name, amount in need.items():
        best_addr, best = max(
            ((addr, float(res.get(name, 0))) for addr, res in offers.items()),
            key=lambda item: item[1],
        )
        if best < amount:
            if best <= 0:
                reason = f"it needs {name}={_fmt(name, amount)} and no worker offers {name}"
            else:
                reason = (
                    f"it needs {name}={_fmt(name, amount)} but the largest any worker offers"
                    f" is {_fmt(name, best)} ({best_addr})"
                )
            if name.startswith(LANE_PREFIX):
                reason += (
                    "; start a worker with this lane (--lanes) or without --lanes"
                    " (check obdask.placement.max-lanes)"
                )
            return reason
    wanted = ", ".join(f"{k}={_fmt(k, v)}" for k, v in need.items())
    return f"no single worker offers all of {wanted} together"


def check_placeable(jobs: Iterable[Job], workers_info: Mapping[str, Mapping[str, Any]]) -> None:
    """Fail fast when a job's resources exceed what every current worker supplies.

    Dask compares a request with each worker's *total* resources; a request no
    worker satisfies would wait in ``no-worker`` state forever.

    Parameters
    ----------
    jobs : iterable of (job_key, step line or id, resources)
        Jobs with empty resources are always placeable.
    workers_info : mapping
        ``client.scheduler_info()["workers"]`` (each value has ``"resources"``).

    Raises
    ------
    PlacementError
        For the first unplaceable job: names it, the missing resource and
        amount, and the largest amount any worker offers.
    """
    offers = {addr: dict(info.get("resources") or {}) for addr, info in workers_info.items()}
    seen: dict[frozenset, bool] = {}
    for job_key, step, need in jobs:
        if not need:
            continue
        signature = frozenset(need.items())
        ok = seen.get(signature)
        if ok is None:
            ok = seen[signature] = any(_supplies(o, need) for o in offers.values())
        if not ok:
            what = f"line {step}" if isinstance(step, int) else f"step {step!r}"
            raise PlacementError(
                f"job {job_key!r} ({what}) cannot be placed: {_unplaceable_reason(need, offers)}"
            )


async def _workers_info(client: Any) -> dict[str, Any]:
    info = await client.scheduler.identity(n_workers=-1)
    return dict(info.get("workers") or {})


async def wait_for_placeable(
    client: Any, jobs: Iterable[Job], timeout: float | str | None = None, interval: float = 0.5
) -> None:
    """Wait until every job is placeable, polling the scheduler.

    Parameters
    ----------
    client : distributed.Client
        Used from its event loop (``await`` it, or ``client.sync(...)``).
    jobs : iterable of Job
        As for :func:`check_placeable`.
    timeout : float or str, optional
        Seconds (or ``"2m"``) to wait for a worker with the missing resource;
        default ``obdask.run.wait-for-resources``.  0: check once.
    interval : float
        Seconds between polls.

    Raises
    ------
    PlacementError
        Still unplaceable when the timeout expires.
    """
    jobs = list(jobs)

    async def attempt() -> None:
        check_placeable(jobs, await _workers_info(client))

    await retry_placement(attempt, timeout, interval)


async def retry_placement(attempt: Callable[[], Awaitable[T]],
                          timeout: float | str | None = None, interval: float = 0.5) -> T:
    """Await ``attempt()`` until it stops raising :class:`PlacementError`.

    Waits up to ``timeout`` (default ``obdask.run.wait-for-resources``; 0: try
    once) for a worker with the missing resource, polling every ``interval``.
    """
    limit = config.get_seconds("run.wait-for-resources", timeout)
    deadline = time.monotonic() + limit
    logged = False
    while True:
        try:
            return await attempt()
        except PlacementError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                if limit <= 0:
                    raise
                raise PlacementError(
                    f"{exc} (waited {limit:g}s; see obdask.run.wait-for-resources)"
                ) from None
            if not logged:
                logger.info("waiting up to %.0fs for a worker: %s", left, exc)
                logged = True
            await asyncio.sleep(min(interval, left))


def ensure_placeable(client: Any, jobs: Iterable[Job], timeout: float | str | None = None) -> Any:
    """Check (or wait, per ``obdask.run.wait-for-resources``) that jobs are placeable.

    Blocks for a synchronous client; returns an awaitable for an asynchronous one.
    """
    return client.sync(wait_for_placeable, client, list(jobs), timeout)


# ------------------------------------------------------------------ locality


@functools.lru_cache(maxsize=4096)
def git_toplevel(path: str) -> str | None:
    """Nearest folder at or above ``path`` that holds ``.git`` (dir or file), or None."""
    current = os.path.abspath(path)
    if not os.path.isdir(current):
        current = os.path.dirname(current)
    while True:
        if os.path.exists(os.path.join(current, ".git")):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def _payload_locality(payload: Any, base: str | None, kinds: tuple[str, ...]) -> str | None:
    """Locality implied by one payload: ``@git:`` and/or ``@file:`` (per ``kinds``)."""
    payload = str(getattr(payload, "raw", payload) or "")
    if "git" in kinds and payload.startswith("@git:"):
        return "git:" + payload[len("@git:") :].strip()
    if "file" in kinds and payload.startswith("@file:"):
        path = payload[len("@file:") :].split("#", 1)[0].strip()
        if not path:
            return None
        if not os.path.isabs(path):
            path = os.path.join(base or os.getcwd(), path)
        top = git_toplevel(path)
        return f"git:{top}" if top else None
    return None


def locality_of(
    step: StepLike, steps_by_id: Mapping[str, StepLike], base: str | os.PathLike | None = None,
    files: bool = True,
) -> str | None:
    """The git checkout ``step`` works in, as a locality key.

    Parameters
    ----------
    step : StepLike
    steps_by_id : mapping
        All steps of the plan, to look at dependencies.
    base : path, optional
        Folder relative ``@file:`` paths are resolved against (the workspace);
        default: the current directory.

    Returns
    -------
    str or None
        The first that applies: the step's explicit ``locality=`` (e.g.
        ``git:<url>@<rev>``); its own ``@git:<url>@<rev>`` payload
        (``git:<url>@<rev>``); a dependency's ``locality=`` or ``@git:``
        payload (in ``deps`` order); the step's own ``@file:`` inside a git
        repository (``git:<toplevel path>``, found by walking up to ``.git``);
        a dependency's ``@file:`` likewise.  None when nothing applies.
    """
    if step.locality:
        return step.locality
    base_dir = os.fspath(base) if base is not None else None
    deps = [steps_by_id[d] for d in (step.deps or ()) if d in steps_by_id]
    found = _payload_locality(step.payload, base_dir, ("git",))
    for dep in deps:
        found = found or dep.locality or _payload_locality(dep.payload, base_dir, ("git",))
    if not files:
        return found
    found = found or _payload_locality(step.payload, base_dir, ("file",))
    for dep in deps:
        found = found or _payload_locality(dep.payload, base_dir, ("file",))
    return found


def locality_keys(
    step: StepLike, steps_by_id: Mapping[str, StepLike], base: str | os.PathLike | None = None,
    files: bool = True,
) -> list[str]:
    """Keys a worker can be warm for: the step's checkout and its model, if any.

    ``files=False`` ignores the locality implied by ``@file:`` paths inside a git
    repository (see ``obdask.placement.file-locality``).
    """
    keys = []
    where = locality_of(step, steps_by_id, base, files=files)
    if where:
        keys.append(where)
    name = model_name(step)
    if name:
        keys.append(model_key(name))
    return keys


def route(
    jobs: Iterable[tuple[str, Iterable[str], Mapping[str, float]]],
    warm: Mapping[str, Iterable[str]],
    workers_info: Mapping[str, Mapping[str, Any]],
) -> dict[str, list[str]]:
    """Preferred workers per job: warm ones first, else one home worker per locality.

    Parameters
    ----------
    jobs
        ``(job key, locality keys, resources needed)`` triples.
    warm
        ``{locality key: [worker addresses]}`` from the scheduler plugin.
    workers_info
        ``scheduler_info()["workers"]`` (resources decide who is capable).

    Returns
    -------
    dict
        ``{job key: [addresses]}``, meant as a *loose* restriction
        (``allow_other_workers=True``): a busy worker's tasks can still be
        stolen and a dead one's go elsewhere, so nothing waits on affinity.
        A locality nobody is warm for gets one home worker, chosen among the
        capable workers with the fewest routed jobs, so its jobs share a clone.

        A job with resources is routed only when every worker supplies them:
        when none of a loose restriction's workers can run a task, Dask falls
        back to *any* worker, resources ignored, and a worker handed a task
        needing a resource it lacks dies (``KeyError: 'lane-1'``).  Such a job
        is placed by its resources alone.
    """
    homes: dict[str, str] = {}
    load: dict[str, int] = {}
    routes: dict[str, list[str]] = {}
    for key, localities, need in jobs:
        capable = [a for a, info in workers_info.items()
                   if _supplies(info.get("resources") or {}, need)]
        if not capable or (need and len(capable) < len(workers_info)):
            continue
        localities = list(localities)
        preferred = list(dict.fromkeys(a for loc in localities for a in warm.get(loc, ())
                                       if a in capable))
        if not preferred and localities:
            home = homes.get(localities[0])
            if home not in capable:
                home = min(capable, key=lambda a: (load.get(a, 0), a))
                homes[localities[0]] = home
            preferred = [home]
        if preferred:
            routes[key] = preferred
            load[preferred[0]] = load.get(preferred[0], 0) + 1
    return routes


async def _warm_workers(client: Any, keys: list[str]) -> dict[str, list[str]]:
    try:
        found = await client.scheduler.obdask_locality_query(keys=keys)
    except Exception as exc:  # plugin not installed: the op is unknown
        logger.debug("obdask locality query failed (plugin not installed?): %s", exc)
        found = None
    if not isinstance(found, dict):  # an unknown op answers an error/None, not a dict
        found = {}
    return {k: list(found.get(k) or []) for k in keys}


def warm_workers(client: Any, keys: Iterable[str]) -> Any:
    """``{key: [worker addresses]}`` that reported being warm for each key.

    Empty lists when nobody is warm or the obdask plugin is not installed.
    Blocks for a synchronous client; returns an awaitable for an asynchronous one.
    """
    return client.sync(_warm_workers, client, list(keys))


# ------------------------------------------------------------ the placement phase

@dataclass(frozen=True)
class ClusterView:
    """One snapshot of the cluster, everything :func:`place` decides from.

    Attributes
    ----------
    workers
        ``{address: identity}`` as the scheduler's ``identity`` lists them
        (``resources``, ``metrics``...); None when there is no cluster (``explain``
        without ``--scheduler``): what depends on the cluster is then left out.
    warm
        ``{locality key: [worker addresses]}`` that reported being warm.
    """

    workers: Mapping[str, Mapping[str, Any]] | None = None
    warm: Mapping[str, list[str]] = field(default_factory=dict)

    @property
    def lanes_active(self) -> bool:
        """Whether jobs must request their lane (some worker takes only some lanes)."""
        return bool(self.workers) and lanes_in_use(self.workers or {})

    @property
    def local_endpoints(self) -> dict[str, str]:
        """``{worker address: URL}`` of workers that serve models from their own endpoint."""
        out = {}
        for addr, info in (self.workers or {}).items():
            url = (info.get("metrics") or {}).get(ENDPOINT_METRIC)
            if url:
                out[addr] = str(url)
        return out

    @property
    def models_served_locally(self) -> bool:
        """True when some worker has a local endpoint: model roles' GPU/VRAM then bind."""
        return bool(self.local_endpoints)


async def cluster_view(client: Any, locality: Iterable[str] = ()) -> ClusterView:
    """Take one :class:`ClusterView` of ``client``'s cluster (two scheduler calls at most)."""
    workers = await _workers_info(client)
    wanted = sorted(set(locality))
    warm = await _warm_workers(client, wanted) if wanted else {}
    return ClusterView(workers=workers, warm=warm)


@dataclass
class Placement:
    """What :func:`place` decided: per-job resources (set on the jobs) and routes."""

    routes: dict[str, list[str]] = field(default_factory=dict)
    cluster_dependent: list[str] = field(default_factory=list)
    threads: int | None = None  # worker threads of the cluster; None: no cluster seen


def place(compiled: Any, view: ClusterView) -> Placement:
    """Decide resources, lanes, placeability and routes of ``compiled``'s jobs.

    Sets ``job.resources`` of every runnable job from its step and the view, so
    ``explain`` and ``run`` give the same annotations from the same view.

    Raises
    ------
    PlacementError
        A job no current worker can run (only when ``view`` has workers).
    """
    jobs = compiled.runnable
    offline = view.workers is None
    served = True if offline else view.models_served_locally
    lanes = view.lanes_active  # a walk over every worker's resources: once, not per job
    for job in jobs:
        job.resources = step_resources(job.step, lanes, served)
    placement = Placement()
    if view.workers is not None:
        placement.threads = sum(int(w.get("nthreads") or 1) for w in view.workers.values())
    if offline:
        if any(step_role(j.step) for j in jobs):
            placement.cluster_dependent.append(
                "model roles' GPU/VRAM bind only where a worker serves models itself "
                "(dask worker --preload obdask.preload.worker --ollama-endpoint URL)")
        placement.cluster_dependent.append("lanes (lane-N resources when a worker takes some)")
        placement.cluster_dependent.append("routes to warm workers")
        return placement
    if view.workers:
        check_placeable([(j.key, j.step.line, j.resources) for j in jobs if j.resources],
                        view.workers)
    if config.get("placement.locality"):
        keyed = [(j.key, j.spec.localities, j.resources) for j in jobs if j.spec.localities]
        placement.routes = route(keyed, view.warm, view.workers or {})
    return placement
