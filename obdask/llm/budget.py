"""Token budgets shared by a whole Dask cluster.

A budget caps the tokens (prompt + output, as the server reports them) spent
by model calls that match it:

==========  =========================================================
scope       a call matches when
==========  =========================================================
model       its model matches ``match`` (``fnmatch`` pattern; null: any)
endpoint    the endpoint URL matches ``match``
plan        the plan name matches ``match``
cluster     always
==========  =========================================================

``window`` (``"1d"``, ``"1h"``, null) makes the budget a sliding window.
Budgets are defined in ``obdask.llm.budgets`` (read by the scheduler and
shipped by :class:`BudgetPlugin`) or with :func:`set_budget` from a client.

Every model call *reserves* its worst case (prompt estimate + ``num_predict``)
before it starts and *settles* the real count after; a reservation that does
not fit waits (``on-exhausted: wait``, up to ``obdask.llm.budget-timeout``) or
raises :class:`~obdask.exceptions.BudgetExceeded`.  So spending never passes a
budget by more than the reservations still in flight.  Reservations belong to
the Dask task (or client) that made them and are released when the task is
cancelled or forgotten, its worker is removed, or the client leaves.

The state lives on the scheduler in :class:`BudgetExtension` (the pattern of
``distributed/semaphore.py``), installed by :class:`BudgetPlugin`::

    client.register_plugin(BudgetPlugin())
    set_budget(client, "daily-coder", 2_000_000, scope="model",
               match="qwen2.5-coder:14b", window="1d")
    budgets(client)          # pandas.DataFrame

Outside Dask the same rules apply to a process-local ledger.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed.diagnostics.plugin import SchedulerPlugin

from obdask import config
from obdask.exceptions import BudgetExceeded, ConfigError

logger = logging.getLogger(__name__)

SCOPES = ("model", "endpoint", "plan", "cluster")
MODES = ("wait", "fail")
EXTENSION = "obdask-budget"
COLUMNS = [
    "name",
    "scope",
    "match",
    "tokens",
    "window",
    "on_exhausted",
    "used",
    "reserved",
    "available",
    "calls",
    "reservations",
]


def _canonical_model(name: str) -> str:
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


@dataclass
class Budget:
    """One token budget and its usage (kept by a :class:`Ledger`)."""

    name: str
    tokens: int
    scope: str = "cluster"
    match: str | None = None
    window: float | None = None
    on_exhausted: str | None = None
    reserved: int = 0
    used_total: int = 0
    calls: int = 0
    events: deque = field(default_factory=deque)
    _window_sum: int = 0

    def matches(self, model: str | None, endpoint: str | None, plan: str | None) -> bool:
        """True if a call with these attributes counts against this budget."""
        if self.scope == "cluster" or self.match in (None, "", "*"):
            return True
        value = {"model": model, "endpoint": endpoint, "plan": plan}[self.scope]
        if value is None:
            return False
        if self.scope == "model":
            return fnmatch.fnmatchcase(_canonical_model(value), _canonical_model(self.match))
        if self.scope == "endpoint":
            return fnmatch.fnmatchcase(value.rstrip("/"), self.match.rstrip("/"))
        return fnmatch.fnmatchcase(value, self.match)

    def used(self, now: float) -> int:
        """Tokens spent in the current window (all time if there is no window)."""
        if self.window is None:
            return self.used_total
        while self.events and self.events[0][0] <= now - self.window:
            self._window_sum -= self.events.popleft()[1]
        return self._window_sum

    def available(self, now: float) -> int:
        """Tokens that a new reservation may still take."""
        return self.tokens - self.used(now) - self.reserved

    def charge(self, tokens: int, now: float) -> None:
        """Record ``tokens`` spent by one call."""
        self.used_total += tokens
        self.calls += 1
        if self.window is not None:
            self.events.append((now, tokens))
            self._window_sum += tokens

    def next_expiry(self, now: float) -> float | None:
        """When the oldest spending leaves the window (None without a window)."""
        if self.window is None or not self.events:
            return None
        return self.events[0][0] + self.window

    def describe(self) -> str:
        """``'daily' (scope model, match 'm1', 1000 tokens per 86400s)``."""
        what = f"scope {self.scope}" + (f", match {self.match!r}" if self.match else "")
        per = f" per {self.window:g}s" if self.window else ""
        return f"{self.name!r} ({what}, {self.tokens} tokens{per})"

    def row(self, now: float, reservations: int = 0) -> dict[str, Any]:
        """One row of :func:`budgets`."""
        return {
            "name": self.name,
            "scope": self.scope,
            "match": self.match,
            "tokens": self.tokens,
            "window": self.window,
            "on_exhausted": self.on_exhausted,
            "used": self.used(now),
            "reserved": self.reserved,
            "available": self.available(now),
            "calls": self.calls,
            "reservations": reservations,
        }


def parse_budget(spec: Mapping[str, Any]) -> Budget:
    """Validate one budget definition from config or :func:`set_budget`.

    Raises
    ------
    ConfigError
        A field is missing or invalid; the message names the budget and the fix.
    """
    spec = {str(k).replace("-", "_"): v for k, v in dict(spec).items()}
    name = spec.get("name")
    if not name or not isinstance(name, str):
        raise ConfigError(f"obdask.llm.budgets: entry {spec!r} needs a 'name' (a string)")
    scope = spec.get("scope") or "cluster"
    if scope not in SCOPES:
        raise ConfigError(f"budget {name!r}: scope {scope!r} is not one of {', '.join(SCOPES)}")
    tokens = spec.get("tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens < 0:
        raise ConfigError(f"budget {name!r}: tokens {tokens!r} must be a number >= 0")
    window = spec.get("window")
    if window is not None:
        try:
            window = float(dask.utils.parse_timedelta(window, default="s"))
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"budget {name!r}: window {window!r} is not a duration (use e.g. '1d')"
            ) from exc
        if window <= 0:
            raise ConfigError(f"budget {name!r}: window must be positive or null")
    mode = spec.get("on_exhausted")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"budget {name!r}: on-exhausted {mode!r} must be 'wait' or 'fail'")
    match = spec.get("match")
    return Budget(
        name=name,
        tokens=int(tokens),
        scope=scope,
        match=None if match is None else str(match),
        window=window,
        on_exhausted=mode,
    )


@dataclass
class Reservation:
    """Tokens held for one in-flight call, and who holds them."""

    id: str
    amount: int
    budgets: list[str]
    model: str | None = None
    endpoint: str | None = None
    plan: str | None = None
    job: str | None = None
    key: Any = None
    worker: str | None = None
    client: str | None = None
    ts: float = 0.0


class Ledger:
    """Budgets and reservations; no locking or waiting (callers provide both).

    Parameters
    ----------
    budgets : iterable of mapping
        Initial definitions (see :func:`parse_budget`).
    default_mode : str, optional
        ``"wait"`` or ``"fail"`` for budgets without ``on_exhausted``;
        default ``obdask.llm.on-exhausted``.
    """

    def __init__(
        self, budgets: Iterable[Mapping[str, Any]] = (), default_mode: str | None = None
    ) -> None:
        self.budgets: dict[str, Budget] = {}
        self.reservations: dict[str, Reservation] = {}
        self.default_mode = default_mode or config.get("llm.on-exhausted") or "wait"
        if self.default_mode not in MODES:
            raise ConfigError(
                f"obdask.llm.on-exhausted is {self.default_mode!r}; use 'wait' or 'fail'"
            )
        for spec in budgets or ():
            self.set_budget(spec)

    def set_budget(self, spec: Mapping[str, Any]) -> Budget:
        """Add or redefine a budget; a redefinition keeps usage and reservations."""
        new = parse_budget(spec)
        old = self.budgets.get(new.name)
        if old is not None:
            new.reserved, new.used_total, new.calls = old.reserved, old.used_total, old.calls
            new.events, new._window_sum = old.events, old._window_sum
            if new.window is None:
                new.events, new._window_sum = deque(), 0
        self.budgets[new.name] = new
        return new

    def remove_budget(self, name: str) -> bool:
        """Delete a budget; True if it existed."""
        for res in self.reservations.values():
            if name in res.budgets:
                res.budgets.remove(name)
        return self.budgets.pop(name, None) is not None

    def matching(self, model: str | None, endpoint: str | None, plan: str | None) -> list[Budget]:
        """Budgets a call with these attributes counts against."""
        return [b for b in self.budgets.values() if b.matches(model, endpoint, plan)]

    def try_reserve(self, rid: str, amount: int, now: float, **attrs: Any) -> dict[str, Any]:
        """Reserve ``amount`` tokens in every matching budget, or say why not.

        Returns
        -------
        dict
            ``status``: ``"ok"`` (with ``budgets``, the matched names),
            ``"blocked"`` (no room now, the budget waits; with ``wake_at``)
            or ``"exhausted"`` (no room and the budget fails fast, or the
            call is larger than the whole budget); plus ``budget`` and a
            ``message`` when not ok.
        """
        if rid in self.reservations:
            return {"status": "ok", "budgets": list(self.reservations[rid].budgets)}
        matched = self.matching(attrs.get("model"), attrs.get("endpoint"), attrs.get("plan"))
        for b in matched:
            if amount > b.tokens:
                msg = (
                    f"token budget {b.describe()} can never fit a call reserving {amount} "
                    f"tokens{_for_job(attrs)}; raise its tokens or lower options.num_predict"
                )
                return {"status": "exhausted", "budget": b.name, "message": msg}
        blocked = [b for b in matched if b.available(now) < amount]
        if blocked:
            b = blocked[0]
            mode = b.on_exhausted or self.default_mode
            msg = (
                f"token budget {b.describe()} has {max(0, b.available(now))} tokens left "
                f"({b.used(now)} used, {b.reserved} reserved); the call needs {amount}"
                f"{_for_job(attrs)}; raise the budget, wait for its window, or set "
                "on-exhausted: wait"
            )
            status = "blocked" if mode == "wait" else "exhausted"
            return {
                "status": status,
                "budget": b.name,
                "message": msg,
                "wake_at": b.next_expiry(now),
            }
        names = [b.name for b in matched]
        if names:
            for b in matched:
                b.reserved += amount
            known = {
                k: attrs.get(k)
                for k in ("model", "endpoint", "plan", "job", "key", "worker", "client")
            }
            self.reservations[rid] = Reservation(rid, amount, names, ts=now, **known)
        return {"status": "ok", "budgets": names}

    def settle(self, rid: str, tokens: int, now: float, **attrs: Any) -> None:
        """Replace reservation ``rid`` by the ``tokens`` the call really used.

        If the reservation was already released (its task was cancelled while
        the call ran on), the tokens are charged to the matching budgets anyway.
        """
        res = self.reservations.pop(rid, None)
        if res is None:
            for b in self.matching(attrs.get("model"), attrs.get("endpoint"), attrs.get("plan")):
                b.charge(int(tokens), now)
            return
        for name in res.budgets:
            b = self.budgets.get(name)
            if b is not None:
                b.reserved -= res.amount
                b.charge(int(tokens), now)

    def release(self, rid: str) -> bool:
        """Drop reservation ``rid`` without spending; True if it existed."""
        res = self.reservations.pop(rid, None)
        if res is None:
            return False
        for name in res.budgets:
            if name in self.budgets:
                self.budgets[name].reserved -= res.amount
        return True

    def release_where(self, **owner: Any) -> list[str]:
        """Release every reservation whose fields equal ``owner`` (e.g. ``worker=addr``)."""
        ids = [
            rid
            for rid, res in self.reservations.items()
            if all(getattr(res, k) == v for k, v in owner.items())
        ]
        for rid in ids:
            self.release(rid)
        return ids

    def wake_at(self, now: float) -> float | None:
        """Earliest time some windowed budget frees tokens."""
        times = [t for b in self.budgets.values() if (t := b.next_expiry(now)) is not None]
        return min(times, default=None)

    def state(self, now: float) -> dict[str, Any]:
        """``{"budgets": [row, ...], "reservations": [dict, ...]}`` (msgpack friendly)."""
        counts: dict[str, int] = defaultdict(int)
        for res in self.reservations.values():
            for name in res.budgets:
                counts[name] += 1
        return {
            "budgets": [b.row(now, counts[b.name]) for b in self.budgets.values()],
            "reservations": [
                {k: (v if k != "key" else _key_str(v)) for k, v in vars(r).items()}
                for r in self.reservations.values()
            ],
        }


def _for_job(attrs: Mapping[str, Any]) -> str:
    parts = [f"model {attrs['model']!r}" if attrs.get("model") else ""]
    if attrs.get("job"):
        parts.append(f"job {attrs['job']!r}")
    if attrs.get("plan"):
        parts.append(f"plan {attrs['plan']!r}")
    text = ", ".join(p for p in parts if p)
    return f" ({text})" if text else ""


def _key_str(key: Any) -> Any:
    if isinstance(key, (list, tuple)):
        return str(tuple(key))
    return key


def _as_key(key: Any) -> Any:
    """msgpack turns tuple keys into lists; turn them back."""
    if isinstance(key, list):
        return tuple(_as_key(k) for k in key)
    return key


class BudgetExtension:
    """Scheduler extension holding the cluster's :class:`Ledger`.

    Adds these handlers to ``scheduler.handlers``:

    * ``obdask_budget_reserve`` (waits while a ``wait`` budget has no room)
    * ``obdask_budget_settle``, ``obdask_budget_release``
    * ``obdask_budget_state``, ``obdask_budget_set``, ``obdask_budget_remove``

    Budgets from the scheduler's ``obdask.llm.budgets`` are loaded at start.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.ledger = Ledger(config.get("llm.budgets") or ())
        self._changed = asyncio.Event()
        self._by_key: dict[Any, set[str]] = defaultdict(set)
        scheduler.handlers.update(
            {
                "obdask_budget_reserve": self.reserve,
                "obdask_budget_settle": self.settle,
                "obdask_budget_release": self.release,
                "obdask_budget_state": self.state,
                "obdask_budget_set": self.set_budget,
                "obdask_budget_remove": self.remove_budget,
            }
        )
        scheduler.extensions[EXTENSION] = self

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _owner_alive(self, key: Any, worker: str | None, client: str | None) -> str:
        """Empty string if the caller still exists, else why not."""
        if worker is not None and worker not in self.scheduler.workers:
            return f"worker {worker} has left the cluster"
        if key is not None:
            ts = self.scheduler.tasks.get(key)
            if ts is None or ts.state != "processing":
                state = "forgotten" if ts is None else ts.state
                return f"task {key!r} is no longer running ({state})"
            on = ts.processing_on
            if worker is not None and on is not None and on.address != worker:
                return f"task {key!r} now runs on {on.address}, not on {worker}"
        elif client is not None and client not in self.scheduler.clients:
            return f"client {client} has disconnected"
        return ""

    async def reserve(
        self,
        id: str,  # noqa: A002
        amount: int,
        timeout: float | None = None,
        key: Any = None,
        worker: str | None = None,
        client: str | None = None,
        **attrs: Any,
    ) -> dict[str, Any]:
        """Handler ``obdask_budget_reserve``; see :meth:`Ledger.try_reserve`.

        ``timeout`` bounds the wait of ``wait`` budgets (None: forever, 0: no
        wait, answering ``"blocked"``).  Answers ``"cancelled"`` when the task
        or client that asked is gone by the time there is room.
        """
        key = _as_key(key)
        start = time.monotonic()
        owner = {"key": key, "worker": worker, "client": client}
        while True:
            gone = self._owner_alive(key, worker, client)
            if gone:
                return {"status": "cancelled", "message": gone}
            now = time.time()
            result = self.ledger.try_reserve(id, int(amount), now, **owner, **attrs)
            if result["status"] == "ok":
                if key is not None and result["budgets"]:
                    self._by_key[key].add(id)
                return result
            if result["status"] != "blocked":
                return result
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if left is not None and left <= 0:
                if timeout:
                    result["status"] = "exhausted"
                    result["message"] += f" (waited {timeout:g}s, obdask.llm.budget-timeout)"
                return result
            wait = left
            if result.get("wake_at") is not None:
                until = max(0.01, result["wake_at"] - now + 0.01)
                wait = until if wait is None else min(wait, until)
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    def settle(self, id: str, tokens: int, key: Any = None, **attrs: Any) -> None:  # noqa: A002
        """Handler ``obdask_budget_settle``: charge the real token count."""
        self.ledger.settle(id, int(tokens), time.time(), **attrs)
        self._forget_id(_as_key(key), id)
        self._notify()

    def release(self, id: str, key: Any = None) -> bool:  # noqa: A002
        """Handler ``obdask_budget_release``: drop a reservation unspent."""
        done = self.ledger.release(id)
        self._forget_id(_as_key(key), id)
        self._notify()
        return done

    def _forget_id(self, key: Any, rid: str) -> None:
        if key is not None and key in self._by_key:
            self._by_key[key].discard(rid)
            if not self._by_key[key]:
                del self._by_key[key]

    def state(self) -> dict[str, Any]:
        """Handler ``obdask_budget_state``."""
        return self.ledger.state(time.time())

    def set_budget(self, budget: dict[str, Any]) -> dict[str, Any]:
        """Handler ``obdask_budget_set``: add or redefine one budget."""
        b = self.ledger.set_budget(budget)
        self._notify()
        return b.row(time.time())

    def remove_budget(self, name: str) -> bool:
        """Handler ``obdask_budget_remove``."""
        done = self.ledger.remove_budget(name)
        self._notify()
        return done

    # -- lifecycle hooks (called by BudgetPlugin) ------------------------------
    def task_left_processing(self, key: Any) -> None:
        """Release what a task reserved once it stops running (cancel, error, worker loss)."""
        ids = self._by_key.pop(key, None)
        if ids:
            for rid in ids:
                self.ledger.release(rid)
            logger.info("released %d token reservation(s) of task %r", len(ids), key)
            self._notify()

    def worker_removed(self, worker: str) -> None:
        """Release every reservation made on ``worker``."""
        ids = self.ledger.release_where(worker=worker)
        if ids:
            logger.info("released %d token reservation(s) of lost worker %s", len(ids), worker)
            for rids in self._by_key.values():
                rids.difference_update(ids)
            self._notify()

    def client_removed(self, client: str) -> None:
        """Release reservations a client made outside any task."""
        ids = self.ledger.release_where(client=client, key=None)
        if ids:
            logger.info("released %d token reservation(s) of client %s", len(ids), client)
            self._notify()


class BudgetPlugin(SchedulerPlugin):
    """Installs :class:`BudgetExtension` on the scheduler; safe to register many times.

    Parameters
    ----------
    budgets : list of mapping, optional
        Budgets to define on start (kept usage if they exist).  Default: this
        process's ``obdask.llm.budgets``, so a client's config reaches a remote
        scheduler.

    Examples
    --------
    >>> client.register_plugin(BudgetPlugin())  # doctest: +SKIP
    """

    name = "obdask-budget"
    idempotent = True

    def __init__(self, budgets: Iterable[Mapping[str, Any]] | None = None) -> None:
        if budgets is None:
            budgets = config.get("llm.budgets") or []
        self.budgets = [dict(b) for b in budgets]
        for b in self.budgets:
            parse_budget(b)  # fail on the client, not on the scheduler
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        ext = scheduler.extensions.get(EXTENSION)
        if ext is None:
            ext = BudgetExtension(scheduler)
        for b in self.budgets:
            ext.set_budget(b)

    def _ext(self) -> BudgetExtension | None:
        return self.scheduler.extensions.get(EXTENSION) if self.scheduler else None

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing" and finish != "processing":
            ext = self._ext()
            if ext is not None and key in ext._by_key:
                ext.task_left_processing(key)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        ext = self._ext()
        if ext is not None:
            ext.worker_removed(worker)

    def remove_client(self, scheduler: Any, client: str) -> None:
        ext = self._ext()
        if ext is not None:
            ext.client_removed(client)


# -- caller side: reserve / settle from a task, a client or a plain process -------


class TokenReservation:
    """Tokens held for one call; :meth:`settle` or :meth:`release` it exactly once."""

    def __init__(self, backend: Any, rid: str, amount: int, budgets: list[str], attrs: dict):
        self._backend = backend
        self.id = rid
        self.amount = amount
        self.budgets = budgets
        self._attrs = attrs
        self._open = bool(budgets)

    def __repr__(self) -> str:
        return f"<TokenReservation {self.amount} tokens in {self.budgets or 'no budget'}>"

    def settle(self, tokens: int) -> None:
        """Charge the real count (prompt_eval_count + eval_count) instead of the reservation."""
        if self._open:
            self._open = False
            try:
                self._backend.settle(self.id, int(tokens), **self._attrs)
            except Exception:  # the call is done; failing it now would only spend more
                logger.error("could not settle %s (%d tokens)", self, tokens, exc_info=True)

    def release(self) -> None:
        """Give the reservation back unspent (the call failed before a final count)."""
        if self._open:
            self._open = False
            try:
                self._backend.release(self.id, key=self._attrs.get("key"))
            except Exception:  # the scheduler also drops it when the task or worker goes
                logger.warning("could not release %s", self, exc_info=True)


def _wait_time(result: dict[str, Any], left: float | None, now: float) -> float | None:
    wait = left
    if result.get("wake_at") is not None:
        until = max(0.01, result["wake_at"] - now + 0.01)
        wait = until if wait is None else min(wait, until)
    return wait


class _LocalBackend:
    """Process-local ledger used when there is no Dask worker or client."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.cond = threading.Condition()
        self._specs: list[dict[str, Any]] = []

    def _sync_config(self) -> None:
        specs = [dict(b) for b in config.get("llm.budgets") or []]
        if specs != self._specs:
            for old in self._specs:
                if old.get("name") not in {s.get("name") for s in specs}:
                    self.ledger.remove_budget(old.get("name"))
            for spec in specs:
                self.ledger.set_budget(spec)
            self._specs = specs

    def reserve(self, rid: str, amount: int, timeout: float | None, **attrs: Any) -> dict:
        start = time.monotonic()
        with self.cond:
            self._sync_config()
            while True:
                now = time.time()
                result = self.ledger.try_reserve(rid, amount, now, **attrs)
                if result["status"] != "blocked":
                    return result
                left = None if timeout is None else timeout - (time.monotonic() - start)
                if left is not None and left <= 0:
                    if timeout:
                        result["status"] = "exhausted"
                        result["message"] += f" (waited {timeout:g}s, obdask.llm.budget-timeout)"
                    return result
                self.cond.wait(_wait_time(result, left, now))

    def settle(self, rid: str, tokens: int, **attrs: Any) -> None:
        with self.cond:
            self.ledger.settle(rid, tokens, time.time(), **attrs)
            self.cond.notify_all()

    def release(self, rid: str, key: Any = None) -> None:
        with self.cond:
            self.ledger.release(rid)
            self.cond.notify_all()

    def owner(self) -> dict[str, Any]:
        return {"key": None, "worker": None, "client": None}


class _RemoteBackend:
    """Talks to :class:`BudgetExtension` from a worker (inside a task) or a client."""

    def __init__(self, kind: str, ctx: Any) -> None:
        self.kind = kind
        self.ctx = ctx

    def _rpc(self, op: str, **kwargs: Any) -> Any:
        if self.kind == "worker":
            from distributed.utils import sync

            return sync(self.ctx.loop, getattr(self.ctx.scheduler, op), **kwargs)
        return self.ctx.sync(getattr(self.ctx.scheduler, op), **kwargs)

    def owner(self) -> dict[str, Any]:
        if self.kind == "worker":
            try:
                key = self.ctx.get_current_task()
            except Exception:
                key = None
            return {"key": key, "worker": self.ctx.address, "client": None}
        return {"key": None, "worker": None, "client": self.ctx.id}

    def install(self) -> None:
        if self.kind == "worker":
            from distributed import get_client

            client = get_client()
        else:
            client = self.ctx
        client.register_plugin(BudgetPlugin())

    def reserve(self, rid: str, amount: int, timeout: float | None, **attrs: Any) -> dict:
        result = self._rpc("obdask_budget_reserve", id=rid, amount=amount, timeout=timeout, **attrs)
        if result is None:  # no BudgetExtension on the scheduler
            if not config.get("llm.budgets"):
                return {"status": "ok", "budgets": []}
            logger.info("installing BudgetPlugin for the budgets in obdask.llm.budgets")
            self.install()
            result = self._rpc(
                "obdask_budget_reserve", id=rid, amount=amount, timeout=timeout, **attrs
            )
        return result or {"status": "ok", "budgets": []}

    def settle(self, rid: str, tokens: int, **attrs: Any) -> None:
        self._rpc("obdask_budget_settle", id=rid, tokens=tokens, **attrs)

    def release(self, rid: str, key: Any = None) -> None:
        self._rpc("obdask_budget_release", id=rid, key=key)


_local_backend: _LocalBackend | None = None
_local_lock = threading.Lock()


def local_backend() -> _LocalBackend:
    """The process-local ledger (used outside Dask)."""
    global _local_backend
    with _local_lock:
        if _local_backend is None:
            _local_backend = _LocalBackend()
        return _local_backend


def reset_local_ledger() -> None:
    """Forget the process-local ledger (for tests)."""
    global _local_backend
    with _local_lock:
        _local_backend = None


def _backend() -> Any:
    from obdask.llm.pool import dask_context

    kind, ctx = dask_context()
    return local_backend() if kind == "local" else _RemoteBackend(kind, ctx)


def reserve(
    amount: int,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    plan: str | None = None,
    job: str | None = None,
    timeout: float | None = None,
) -> TokenReservation | None:
    """Reserve ``amount`` tokens in every budget this call matches.

    Parameters
    ----------
    amount : int
        Worst-case tokens of the call (prompt estimate + ``num_predict``).
    model, endpoint, plan, job : str, optional
        What the call is; budgets match on model, endpoint and plan.
    timeout : float, optional
        How long a ``wait`` budget may wait; default ``obdask.llm.budget-timeout``.
        ``0`` does not wait and returns None instead.

    Returns
    -------
    TokenReservation or None
        None only with ``timeout=0`` when a ``wait`` budget has no room now.

    Raises
    ------
    BudgetExceeded
        A ``fail`` budget has no room, the call can never fit, the wait timed
        out, or the task that asked was cancelled meanwhile.
    """
    if timeout is None:
        timeout = config.get_seconds("llm.budget-timeout")
    backend = _backend()
    rid = uuid.uuid4().hex
    attrs = {"model": model, "endpoint": endpoint, "plan": plan, "job": job, **backend.owner()}
    result = backend.reserve(rid, int(amount), timeout, **attrs)
    status = result.get("status")
    if status == "ok":
        return TokenReservation(backend, rid, int(amount), list(result["budgets"]), attrs)
    if status == "blocked" and not timeout:
        return None
    raise BudgetExceeded(result.get("message") or f"token budget {result.get('budget')!r}")


# -- client side: define and inspect budgets ---------------------------------------


def _client_call(client: Any, op: str, post: Any, install: bool, **kwargs: Any) -> Any:
    async def run() -> Any:
        if install:
            await client.register_plugin(BudgetPlugin())
        return post(await getattr(client.scheduler, op)(**kwargs))

    return client.sync(run)


def install(client: Any) -> Any:
    """Register :class:`BudgetPlugin` on ``client``'s scheduler (idempotent).

    Awaitable when ``client`` is asynchronous.
    """
    return client.register_plugin(BudgetPlugin())


def set_budget(
    client: Any,
    name: str,
    tokens: int,
    *,
    scope: str = "cluster",
    match: str | None = None,
    window: str | float | None = None,
    on_exhausted: str | None = None,
) -> Any:
    """Define or change a budget on the cluster (usage so far is kept).

    Parameters
    ----------
    client : distributed.Client
        Any client of the cluster; the plugin is installed if needed.
    name : str
        Budget name (shown in :class:`~obdask.exceptions.BudgetExceeded`).
    tokens : int
        Tokens allowed (per ``window``).
    scope : {"model", "endpoint", "plan", "cluster"}
        What ``match`` is compared with.
    match : str, optional
        ``fnmatch`` pattern; None matches everything.
    window : str or float, optional
        Sliding window (``"1d"``); None means for the life of the scheduler.
    on_exhausted : {"wait", "fail"}, optional
        Default ``obdask.llm.on-exhausted``.

    Returns
    -------
    dict
        The budget's row (awaitable when ``client`` is asynchronous).
    """
    spec = {
        "name": name,
        "tokens": tokens,
        "scope": scope,
        "match": match,
        "window": window,
        "on_exhausted": on_exhausted,
    }
    parse_budget(spec)
    return _client_call(client, "obdask_budget_set", lambda r: r, True, budget=spec)


def remove_budget(client: Any, name: str) -> Any:
    """Delete a budget from the cluster; True if it existed."""
    return _client_call(client, "obdask_budget_remove", bool, False, name=name)


def _frame(state: dict[str, Any] | None, part: str) -> Any:
    import pandas as pd

    rows = (state or {}).get(part) or []
    if part == "budgets":
        return pd.DataFrame(rows, columns=COLUMNS).set_index("name")
    return pd.DataFrame(rows)


def budgets(client: Any = None) -> Any:
    """Budget state as a :class:`pandas.DataFrame` indexed by name.

    Columns: ``scope, match, tokens, window, on_exhausted, used, reserved,
    available, calls, reservations``.  Without ``client``, the process-local
    ledger.  Awaitable when ``client`` is asynchronous.
    """
    if client is None:
        backend = local_backend()
        with backend.cond:
            backend._sync_config()
            return _frame(backend.ledger.state(time.time()), "budgets")
    return _client_call(client, "obdask_budget_state", lambda s: _frame(s, "budgets"), False)


def reservations(client: Any = None) -> Any:
    """Reservations in flight as a :class:`pandas.DataFrame` (one row each)."""
    if client is None:
        backend = local_backend()
        with backend.cond:
            return _frame(backend.ledger.state(time.time()), "reservations")
    return _client_call(client, "obdask_budget_state", lambda s: _frame(s, "reservations"), False)
