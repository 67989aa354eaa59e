"""The caller side of token budgets: :func:`reserve` and its backends.

A model call reserves its worst case with :func:`reserve` and settles (or
releases) the :class:`TokenReservation` afterwards.  Inside a Dask task or
with a client the reservation is made on the scheduler's
:class:`~obdask.llm.budget.extension.BudgetExtension` (:class:`_RemoteBackend`);
in a plain process, in the process-local ledger (:func:`local_backend`).  Beside an
asynchronous client a call made in a thread reserves on the cluster as with a synchronous
one; on that client's event loop it is refused (:func:`_refuse_on_an_asynchronous_loop`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

from obdask import config
from obdask.exceptions import BudgetExceeded, ModelError
from obdask.llm.budget.ledger import Ledger, configured_budgets, out_of_time, wait_time

logger = logging.getLogger(__name__)


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


class _LocalBackend:
    """Process-local ledger used when there is no Dask worker or client."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.cond = threading.Condition()
        self._specs: list[dict[str, Any]] = []

    def _sync_config(self) -> None:
        specs = configured_budgets()
        if specs != self._specs:
            names = {s.get("name") for s in specs}
            for old in self._specs:
                if old.get("name") not in names:
                    self.ledger.remove_budget(str(old["name"]))  # validated: has a name
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
                if out_of_time(result, timeout, left):
                    return result
                self.cond.wait(wait_time(result, left, now))

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
        from obdask.server import install  # imports this package's ledger: import late

        install(client)

    def reserve(self, rid: str, amount: int, timeout: float | None, **attrs: Any) -> dict:
        # Always asked, never cached: a budget set at any moment (set_budget, another
        # client's config) must bind the very next call.  One round trip per model call.
        result = self._rpc("obdask_budget_reserve", id=rid, amount=amount, timeout=timeout, **attrs)
        if result is None:
            # No BudgetExtension on the scheduler (a cluster without obdask's preload, and
            # model calls outside obdask.run): install it once (idempotent), then ask again,
            # so budgets set later are enforced and the scheduler logs no "no handler".
            logger.info("installing the obdask scheduler plugin for token budgets")
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


def _refuse_on_an_asynchronous_loop() -> None:
    """Raise when this runs on the event loop of the default, asynchronous client.

    From any other thread such a client reports itself synchronous
    (``Client.asynchronous``) and the call reserves on the cluster like any other;
    on its own loop a blocking call cannot wait for the scheduler's answer (the loop
    that must deliver it is the one blocked), and falling back to the process-local
    ledger would silently ignore the cluster's budgets.

    Raises
    ------
    ModelError
        Saying to run the call in a thread.
    """
    try:
        from distributed.client import default_client

        client = default_client()
        running = asyncio.get_running_loop()
    except (ImportError, ValueError, RuntimeError):  # no client, or no loop in this thread
        return
    if getattr(client, "_asynchronous", False) and client.status in (
            "running", "connecting", "newly-created") and running is client.loop.asyncio_loop:
        raise ModelError("a model call on the event loop of an asynchronous client would block "
                         "it and cannot reserve tokens on the cluster's budgets: run it in a "
                         "thread (await asyncio.to_thread(...))")


def _backend() -> Any:
    from obdask.llm.pool import dask_context

    kind, ctx = dask_context()
    if kind != "local":
        return _RemoteBackend(kind, ctx)
    _refuse_on_an_asynchronous_loop()
    return local_backend()


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
