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
shipped by :class:`obdask.server.ObdaskPlugin`) or with :func:`set_budget` from a client.

Every model call *reserves* its worst case (prompt estimate + ``num_predict``)
before it starts and *settles* the real count after; a reservation that does
not fit waits (``on-exhausted: wait``, up to ``obdask.llm.budget-timeout``) or
raises :class:`~obdask.exceptions.BudgetExceeded`.  So spending never passes a
budget by more than the reservations still in flight.  Reservations belong to
the Dask task (or client) that made them and are released when the task is
cancelled or forgotten, its worker is removed, or the client leaves.

The state lives on the scheduler in :class:`obdask.server.budgets.BudgetExtension`
(the pattern of ``distributed/semaphore.py``), hosted by obdask's scheduler plugin::

    obdask.llm.budget.install(client)
    set_budget(client, "daily-coder", 2_000_000, scope="model",
               match="qwen2.5-coder:14b", window="1d")
    budgets(client)          # pandas.DataFrame

Outside Dask the same rules apply to a process-local ledger.
"""

from __future__ import annotations

import logging

from obdask.llm.budget.client import budgets, install, remove_budget, reservations, set_budget
from obdask.llm.budget.ledger import (
    COLUMNS,
    MODES,
    SCOPES,
    Budget,
    Ledger,
    Reservation,
    parse_budget,
)
from obdask.llm.budget.reservation import (
    TokenReservation,
    local_backend,
    reserve,
    reset_local_ledger,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Budget",
    "COLUMNS",
    "Ledger",
    "MODES",
    "Reservation",
    "SCOPES",
    "TokenReservation",
    "budgets",
    "install",
    "local_backend",
    "parse_budget",
    "remove_budget",
    "reservations",
    "reserve",
    "reset_local_ledger",
    "set_budget",
]
