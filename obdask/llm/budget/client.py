"""Client-side helpers to define and inspect the cluster's token budgets.

:func:`install`, :func:`set_budget` and :func:`remove_budget` change the
budgets on the scheduler; :func:`budgets` and :func:`reservations` return
their state as :class:`pandas.DataFrame` (the process-local ledger without a
client).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from obdask.llm.budget.ledger import COLUMNS, parse_budget
from obdask.llm.budget.reservation import local_backend

logger = logging.getLogger(__name__)


def _client_call(client: Any, op: str, post: Any, install: bool, **kwargs: Any) -> Any:
    async def run() -> Any:
        if install:
            await _install(client)
        return post(await getattr(client.scheduler, op)(**kwargs))

    return client.sync(run)


def install(client: Any) -> Any:
    """Install obdask's scheduler plugin (which holds the budgets); idempotent.

    Awaitable when ``client`` is asynchronous.
    """
    return _install(client)


def _install(client: Any) -> Any:
    # The server package imports the ledger of this package: import it late.
    from obdask.server import install as install_server

    return install_server(client)


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
