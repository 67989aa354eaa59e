"""Ollama endpoints as a pool: discovery, health, model lists and concurrency slots.

Endpoints come from ``obdask.llm.endpoints`` plus ``OLLAMA_HOST`` (when set),
with a per-worker preferred endpoint (``obdask.llm.local-endpoint``) tried
first.  Each process keeps one :class:`EndpointPool` per endpoint list (see
:func:`get_pool`) holding:

* health: an endpoint that refused a connection, answered 5xx or timed out is
  *down* for ``obdask.llm.cool-off`` seconds and is only tried when no healthy
  endpoint has the model;
* model lists: ``/api/tags`` per endpoint, cached for ``obdask.llm.tags-ttl``;
* slots: concurrent calls per ``(endpoint, model)`` are capped cluster-wide by
  a :class:`distributed.Semaphore` named ``obdask-llm-<endpoint>-<model>``
  with ``obdask.llm.slots`` (or ``model-slots``) leases, or by a process-local semaphore when the
  caller is neither inside a Dask task nor has a Dask client.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dask

from obdask import config
from obdask.exceptions import ConfigError, ModelError
from obdask.llm.urls import normalize_url
from obdask.waiting import note

logger = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"
_POLL = 0.25  # seconds between scans of all candidate endpoints for a free slot
_NO_TABLE_BACKOFF = 5.0  # seconds before asking a scheduler without obdask_slots_free again
_TAGS_THREADS = 16  # endpoints asked for their model lists at once


def canonical_model(name: str) -> str:
    """Return ``name`` with ``:latest`` added when it has no tag."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def endpoint_urls(
    endpoints: str | Iterable[str] | None = None, local: str | None = None
) -> list[str]:
    """The endpoints to use, preferred first, without duplicates.

    Parameters
    ----------
    endpoints : str or list of str, optional
        Base URLs; default ``obdask.llm.endpoints`` plus ``OLLAMA_HOST`` when set.
        A string may hold several, separated by commas.
    local : str, optional
        This worker's preferred endpoint; default ``obdask.llm.local-endpoint``.

    Returns
    -------
    list of str
        Normalised URLs; ``http://127.0.0.1:11434`` when nothing is configured.
    """
    if endpoints is None:
        endpoints = config.get("llm.endpoints") or []
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        endpoints = list(endpoints)
        if os.environ.get("OLLAMA_HOST"):
            endpoints.append(os.environ["OLLAMA_HOST"])
    if isinstance(endpoints, str):
        endpoints = endpoints.split(",")
    local = local if local is not None else config.get("llm.local-endpoint")
    # one pass: a fleet's list has hundreds of endpoints, and this runs once a call
    urls = [normalize_url(e) for e in ([local] if local else []) + list(endpoints)
            if e and e.strip()]
    return list(dict.fromkeys(urls)) or [DEFAULT_HOST]


def slots_for(model: str) -> int:
    """Concurrent calls allowed per endpoint for ``model``.

    ``obdask.llm.model-slots`` (``{"qwen2.5-coder:14b": 2}``) overrides
    ``obdask.llm.slots`` (an int for every model; a mapping with a
    ``default`` key is accepted too).
    """
    overrides = config.get("llm.model-slots") or {}
    raw = config.get("llm.slots")
    if isinstance(raw, dict):
        overrides = {**raw, **overrides}
        raw = raw.get("default", 1)
    value = overrides.get(model, overrides.get(canonical_model(model), raw))
    if model.endswith(":latest"):
        value = overrides.get(model.removesuffix(":latest"), value)
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ConfigError(f"obdask.llm.slots for model {model!r} is {value!r}; use an integer >= 1")
    return n


@dataclass
class EndpointState:
    """Health and model list of one endpoint, as this process sees it."""

    url: str
    down_until: float = 0.0
    reason: str = ""
    failures: int = 0
    tags: frozenset[str] | None = None
    tags_at: float = 0.0

    def healthy(self, now: float | None = None) -> bool:
        """True unless the endpoint is cooling off after a failure."""
        return (now or time.monotonic()) >= self.down_until


class SlotLease:
    """A held concurrency slot on one endpoint; call :meth:`release` exactly once."""

    def __init__(self, url: str, model: str, semaphore: Any, gate: Any = None) -> None:
        self.url = url
        self.model = model
        self._semaphore = semaphore
        self._gate = gate
        self._held = True
        #: Whether the scheduler was told this task holds the slot (obdask why).
        self.noted = False

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        if self._held:
            self._held = False
            if self.noted:
                note("holds", None)
            for sem in (self._semaphore, self._gate):
                if sem is None:
                    continue
                try:
                    sem.release()
                except Exception:  # the lease times out on the scheduler anyway
                    logger.warning(
                        "could not release slot %s on %s", self.model, self.url, exc_info=True
                    )

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def dask_context() -> tuple[str, Any]:
    """Where this runs: ``("worker", Worker)``, ``("client", Client)`` or ``("local", None)``.

    ``"worker"`` inside a Dask task; ``"client"`` when a synchronous default
    client exists; ``"local"`` otherwise (process-local slots and budgets).
    """
    try:
        from distributed import get_worker
        from distributed.client import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return "local", None
    try:
        return "worker", get_worker()
    except ValueError:
        pass
    try:
        client = default_client()
    except ValueError:
        return "local", None
    # An asynchronous client cannot serve blocking calls from this thread.
    if client.status in ("running", "connecting", "newly-created") and not client.asynchronous:
        return "client", client
    return "local", None


_local_semaphores: dict[tuple[str, str, int], threading.BoundedSemaphore] = {}
_dask_semaphores: dict[tuple[Any, ...], Any] = {}
_sem_lock = threading.Lock()


class _LocalSlot:
    """Adapter giving a threading semaphore the ``acquire(timeout)`` of a Dask one."""

    def __init__(self, sem: threading.BoundedSemaphore) -> None:
        self._sem = sem

    def acquire(self, timeout: float | None = None) -> bool:
        if timeout is not None and timeout <= 0:
            return self._sem.acquire(blocking=False)
        return self._sem.acquire(timeout=timeout)

    def release(self) -> None:
        self._sem.release()


def slot_semaphore(url: str, model: str, leases: int | None = None) -> Any:
    """The semaphore capping calls of ``model`` on ``url`` (Dask-wide when possible).

    Returns
    -------
    object
        A :class:`distributed.Semaphore` named ``obdask-llm-<url>-<model>``
        inside a Dask worker or client context, else a process-local semaphore
        with the same ``acquire(timeout)`` / ``release()`` methods.
    """
    model = canonical_model(model)
    n = slots_for(model) if leases is None else leases
    return _semaphores([url], model, n)[0][1]


def _semaphores(urls: Sequence[str], model: str, leases: int) -> list[tuple[str, Any]]:
    """``(url, slot_semaphore(url, model, leases))`` for each of ``urls``: one pass,
    the Dask context and the lock taken once (a call may face hundreds of endpoints)."""
    kind, ctx = dask_context()
    out: list[tuple[str, Any]] = []
    with _sem_lock:
        if kind == "local":
            for url in urls:
                key = (url, model, leases)
                if key not in _local_semaphores:
                    _local_semaphores[key] = threading.BoundedSemaphore(leases)
                out.append((url, _LocalSlot(_local_semaphores[key])))
            return out
        from distributed import Semaphore

        where = (id(ctx), getattr(ctx, "address", None) or getattr(ctx, "id", None))
        for url in urls:
            ckey = (*where, url, model, leases)
            sem = _dask_semaphores.get(ckey)
            if sem is None:
                sem = Semaphore(max_leases=leases, name=f"obdask-llm-{url}-{model}")
                _dask_semaphores[ckey] = sem
            out.append((url, sem))
        return out


_funnels: dict[int, threading.Lock] = {}  # id(semaphore) -> its local line


def _acquire(sem: Any, url: str, model: str, timeout: float | None) -> bool:
    try:
        if isinstance(sem, _LocalSlot) or (timeout is not None and timeout <= 0):
            return bool(sem.acquire(timeout=timeout))
        return _acquire_in_line(sem, timeout)
    except ValueError as exc:
        if "Inconsistent max leases" in str(exc):
            raise ConfigError(
                f"obdask.llm.slots for {model!r} on {url} differs between processes ({exc}); "
                "set the same obdask.llm.slots on every worker and client"
            ) from exc
        raise


def _acquire_in_line(sem: Any, timeout: float | None) -> bool:
    """A blocking ``acquire`` of a Dask semaphore, one waiting thread per process.

    distributed's semaphore extension wakes every waiting acquire on each release,
    and each re-arms its timeout and tries again: a queue of N waiting threads cost
    the scheduler N wake-ups per release.  Threads of this process wait in line on
    a local lock (one per semaphore object: per client or worker, endpoint and
    model); only the one at its head waits on the scheduler, so a release wakes
    at most one waiter per process.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with _sem_lock:
        line = _funnels.setdefault(id(sem), threading.Lock())
    if not line.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
        return False
    try:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return bool(sem.acquire(timeout=left))
    finally:
        line.release()


class EndpointPool:
    """Endpoints with health state, cached model lists and slot acquisition.

    Parameters
    ----------
    urls : sequence of str
        Endpoint base URLs, preferred first (see :func:`endpoint_urls`).
    cool_off : float, optional
        Seconds an endpoint stays down after a failure (``obdask.llm.cool-off``).
    tags_ttl : float, optional
        Seconds a ``/api/tags`` answer is reused (``obdask.llm.tags-ttl``).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        cool_off: float | None = None,
        tags_ttl: float | None = None,
    ) -> None:
        self.urls = [normalize_url(u) for u in urls]
        self.cool_off = config.get_seconds("llm.cool-off", cool_off)
        self.tags_ttl = config.get_seconds("llm.tags-ttl", tags_ttl)
        self.states = {u: EndpointState(u) for u in self.urls}
        self._lock = threading.Lock()
        self._fetching = {u: threading.Lock() for u in self.urls}
        self._asking = threading.Lock()

    def __repr__(self) -> str:
        now = time.monotonic()
        health = ", ".join(
            f"{u} {'up' if s.healthy(now) else 'down'}" for u, s in self.states.items()
        )
        return f"<EndpointPool {health}>"

    # -- health --------------------------------------------------------------
    def healthy(self, url: str) -> bool:
        """True unless ``url`` is cooling off after a failure."""
        return self.states[url].healthy()

    def mark_down(self, url: str, reason: str) -> None:
        """Skip ``url`` for ``cool_off`` seconds (connection refused, 5xx, timeout)."""
        with self._lock:
            state = self.states[url]
            state.down_until = time.monotonic() + self.cool_off
            state.reason = reason
            state.failures += 1
        logger.warning("Ollama endpoint %s marked down for %.0fs: %s", url, self.cool_off, reason)

    def mark_up(self, url: str) -> None:
        """Record a successful call on ``url``."""
        state = self.states[url]
        if state.failures or state.down_until:
            with self._lock:
                state.failures = 0
                state.down_until = 0.0
                state.reason = ""

    # -- model lists ---------------------------------------------------------
    def tags(self, url: str, refresh: bool = False) -> frozenset[str] | None:
        """Models installed on ``url`` (canonical names), or None if it cannot be asked now."""
        state = self.states[url]
        now = time.monotonic()
        if not refresh and state.tags is not None and now - state.tags_at < self.tags_ttl:
            return state.tags
        if not state.healthy(now) and not refresh:
            return state.tags
        # One asker per endpoint: the threads of a worker starting calls together
        # would otherwise each ask every endpoint (threads x endpoints requests).
        # Others reuse a stale list while it is refreshed, or wait for the first list.
        fetching = self._fetching[url]
        if not fetching.acquire(blocking=state.tags is None or refresh):
            return state.tags
        try:
            if not refresh and (state.tags_at > now or not state.healthy()):
                return state.tags  # asked (or found down) while this thread waited
            return self._fetch_tags(url)
        finally:
            fetching.release()

    def _fetch_tags(self, url: str) -> frozenset[str] | None:
        state = self.states[url]
        try:
            from obdask.llm.auth import ollama_client

            with ollama_client(url, min(10.0, self.cool_off or 10.0)) as client:
                listing = client.list()
        except Exception as exc:  # refused, timeout, 5xx, bad body: all mean "not usable"
            self.mark_down(url, f"/api/tags failed: {type(exc).__name__}: {exc}")
            return state.tags
        names = frozenset(canonical_model(m.model) for m in listing.models if m.model)
        with self._lock:
            state.tags, state.tags_at = names, time.monotonic()
        return names

    def _ask_tags(self, urls: list[str]) -> None:
        """Ask the endpoints whose model list is unknown or old, all at once.

        One after the other, a first call facing 100 endpoints would wait for 100
        answers (and a slow or dead one for its time-out) before taking a slot.
        """
        old = self._old_tags(urls)
        if len(old) < 2:
            return
        # One thread asks; the others wait for it only when they know no list at all.
        if not self._asking.acquire(blocking=any(self.states[u].tags is None for u in old)):
            return
        try:
            old = self._old_tags(urls)  # another thread may have asked meanwhile
            if len(old) < 2:
                return
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(_TAGS_THREADS, len(old)),
                                    thread_name_prefix="obdask-tags") as ex:
                list(ex.map(self.tags, old))
        finally:
            self._asking.release()

    def _old_tags(self, urls: list[str]) -> list[str]:
        now = time.monotonic()
        return [u for u in urls if self.states[u].tags is None
                or now - self.states[u].tags_at >= self.tags_ttl]

    def forget_tags(self, url: str) -> None:
        """Drop the cached model list of ``url`` (after it answered 404 for a listed model)."""
        with self._lock:
            self.states[url].tags = None

    def candidates(self, model: str, exclude: Iterable[str] = ()) -> list[str]:
        """Endpoints to try for ``model``: healthy ones listing it, else down ones that might.

        Parameters
        ----------
        model : str
            Model name.
        exclude : iterable of str
            Endpoints not to return (e.g. ones that answered 404).

        Returns
        -------
        list of str
            Healthy endpoints whose ``/api/tags`` list ``model``, in preference
            order; when there are none, the down endpoints whose last known
            list had the model, soonest back first.  Empty if no endpoint has it.
        """
        model = canonical_model(model)
        skip = set(exclude)
        healthy = [u for u in self.urls if u not in skip and self.healthy(u)]
        self._ask_tags(healthy)
        found = [u for u in healthy if model in (self.tags(u) or ())]
        if found:
            return found
        down = [u for u in self.urls if u not in skip and not self.healthy(u)]
        maybe = [u for u in down if self.states[u].tags is None or model in self.states[u].tags]
        return sorted(maybe, key=lambda u: self.states[u].down_until)

    def where_is(self, model: str) -> dict[str, str]:
        """For error messages: each endpoint and whether it has ``model``."""
        model = canonical_model(model)
        out = {}
        for url, state in self.states.items():
            if not state.healthy():
                out[url] = f"down ({state.reason})"
            elif state.tags is None:
                out[url] = "model list unknown"
            else:
                out[url] = "has it" if model in state.tags else "does not have it"
        return out

    # -- slots ---------------------------------------------------------------
    def acquire_slot(
        self, urls: Sequence[str], model: str, timeout: float | None = None
    ) -> SlotLease:
        """Hold a concurrency slot on the first of ``urls`` that has one free.

        Parameters
        ----------
        urls : sequence of str
            Candidate endpoints in preference order.
        model : str
            Model name (slots are per endpoint and model).
        timeout : float, optional
            Seconds to wait for a slot; None waits forever.

        Raises
        ------
        TimeoutError
            No slot became free in time.
        """
        if not urls:
            raise ValueError("acquire_slot needs at least one endpoint")
        # obdask why: the scheduler learns who waits for and who holds the slots
        noted = note("waiting", {"cause": "slots", "model": model, "urls": list(urls)})
        try:
            lease = self._acquire_slot(urls, model, timeout)
        except BaseException:
            if noted:
                note("waiting", None)
            raise
        if noted:
            lease.noted = note("holds", {"model": model, "url": lease.url})
        return lease

    def _acquire_slot(self, urls: Sequence[str], model: str, timeout: float | None
                      ) -> SlotLease:
        deadline = None if timeout is None else time.monotonic() + timeout
        canonical = canonical_model(model)
        slots = slots_for(canonical)  # read once a call, not once per endpoint
        sems = _semaphores(urls, canonical, slots)
        if len(sems) > 1:
            lease = self._acquire_gated(sems, model, timeout, slots)
            if lease is not None:
                return lease
        while True:
            if len(sems) > 1:
                for url, sem in sems:
                    if _acquire(sem, url, model, 0):
                        return SlotLease(url, model, sem)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(
                    f"no free slot for model {model!r} on {', '.join(urls)} within {timeout}s; "
                    "raise obdask.llm.slots or obdask.llm.slot-timeout"
                )
            wait = left if len(sems) == 1 else min(_POLL, left if left is not None else _POLL)
            url, sem = sems[0]
            if _acquire(sem, url, model, wait):
                return SlotLease(url, model, sem)


    def _acquire_gated(self, sems: list[tuple[str, Any]], model: str,
                       timeout: float | None, slots: int) -> SlotLease | None:
        """Wait on one gate sized to the slots of all ``sems``, then take a free one.

        Every holder of an endpoint slot holds a gate lease, so a caller that got
        a gate lease finds a free endpoint slot: nobody waits on a busy endpoint
        while another has room.  None: no endpoint slot after all (a process with
        another view of the slots); the caller falls back to polling.
        """
        urls = sorted(u for u, _ in sems)
        gate = slot_semaphore("any:" + ",".join(urls), model, leases=slots * len(urls))
        if not _acquire(gate, "any", model, timeout):
            raise TimeoutError(
                f"no free slot for model {model!r} on {', '.join(urls)} within {timeout}s; "
                "raise obdask.llm.slots or obdask.llm.slot-timeout"
            )
        for url, sem in _roomiest_first(sems):
            if _acquire(sem, url, model, 0):
                return SlotLease(url, model, sem, gate)
        gate.release()
        return None


def _roomiest_first(sems: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``sems`` in the order to try them: the preferred one if it has room, then most room.

    The free counts come from the scheduler in one round trip
    (:class:`obdask.server.slots.SlotsExtension`); without them (process-local
    slots, a scheduler without obdask's plugin) the preference order is kept.
    Endpoints with no room by the count come last: a count may be stale.
    """
    free = _free_slots([getattr(sem, "name", None) for _, sem in sems])
    if free is None:
        return sems
    room = [n is None or n > 0 for n in free]
    first = [0] if room[0] else []
    # Callers let in together see the same counts: a random order among equals keeps
    # them from all trying the same endpoint first (and then the next, and the next).
    rest = [i for i in range(1, len(sems)) if room[i]]
    random.shuffle(rest)
    rest.sort(key=lambda i: -(free[i] if free[i] is not None else 1 << 30))
    full = [i for i in range(len(sems)) if not room[i]]
    return [sems[i] for i in first + rest + full]


_no_slot_table_until = 0.0  # monotonic time before which the scheduler is not asked again


def _free_slots(names: list[str | None]) -> list[int | None] | None:
    """Free leases per Dask semaphore name (None: unknown), or None if not askable."""
    global _no_slot_table_until
    if any(n is None for n in names) or time.monotonic() < _no_slot_table_until:
        return None
    kind, ctx = dask_context()
    try:
        if kind == "worker":
            from distributed.utils import sync

            answer = sync(ctx.loop, ctx.scheduler.obdask_slots_free, names=names)
        elif kind == "client":
            answer = ctx.sync(ctx.scheduler.obdask_slots_free, names=names)
        else:
            return None
    except Exception:  # the counts only order the tries: never fail a call for them
        logger.debug("obdask: could not ask the scheduler for free slots", exc_info=True)
        answer = None
    if not isinstance(answer, (list, tuple)) or len(answer) != len(names):
        # A scheduler without obdask's plugin answers None (and logs "no handler"): the
        # budget reservation of this very call installs it; ask again a little later.
        _no_slot_table_until = time.monotonic() + _NO_TABLE_BACKOFF
        return None
    return list(answer)


_pools: dict[tuple[tuple[str, ...], float, float], EndpointPool] = {}
_pools_lock = threading.Lock()


def get_pool(
    endpoints: str | Iterable[str] | None = None, local: str | None = None
) -> EndpointPool:
    """The process-wide :class:`EndpointPool` for these endpoints (health is shared).

    Parameters
    ----------
    endpoints : str or list of str, optional
        See :func:`endpoint_urls`.
    local : str, optional
        Preferred endpoint; default ``obdask.llm.local-endpoint``.
    """
    urls = tuple(endpoint_urls(endpoints, local))
    cool_off = config.get_seconds("llm.cool-off")
    ttl = config.get_seconds("llm.tags-ttl")
    key = (urls, cool_off, ttl)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = EndpointPool(urls, cool_off=cool_off, tags_ttl=ttl)
        return pool


def reset_pools() -> None:
    """Forget all pools and local semaphores (health, cached tags); for tests."""
    with _pools_lock:
        _pools.clear()
    with _sem_lock:
        _local_semaphores.clear()
        for sem in _dask_semaphores.values():
            callback = getattr(sem, "refresh_callback", None)
            if callback is not None:
                callback.stop()
        _dask_semaphores.clear()
        _funnels.clear()


def resolve_model(role_or_model: str) -> str:
    """Map a role from ``obdask.placement.models`` to its model; other names pass through.

    Raises
    ------
    ModelError
        The role exists but names no model.
    """
    roles = dask.config.get("obdask.placement.models", default={}) or {}
    if role_or_model in roles:
        entry = roles[role_or_model]
        model = entry.get("model") if isinstance(entry, dict) else entry
        if not model:
            raise ModelError(
                f"role {role_or_model!r} has no model; set obdask.placement.models."
                f"{role_or_model}.model"
            )
        return str(model)
    if not role_or_model:
        raise ModelError("no model or role given; pass a role from obdask.placement.models")
    return role_or_model
