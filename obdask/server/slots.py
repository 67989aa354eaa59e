"""Scheduler extension: free model-call slots of many endpoints in one round trip.

A model call that may go to any of K endpoints holds one of their concurrency
slots, each a :class:`distributed.Semaphore` (``obdask-llm-<endpoint>-<model>``,
see :mod:`obdask.llm.pool`).  Trying the endpoints' semaphores in a fixed order
costs up to K round trips per call and piles every caller onto the first
endpoints; so the caller first asks ``obdask_slots_free(names)`` how many leases
each semaphore has free and tries the roomiest first: usually one try.

The answer is read from Dask's own ``SemaphoreExtension`` (its ``max_leases``
and ``leases`` tables) without changing it: the semaphores stay the one source
of truth for the caps, lease time-outs and releases; this extension keeps no
state.  A count may be stale by the time the caller tries (another caller took
the slot): the caller then tries the next endpoint.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: Semaphore names answered at most per request (a plan's endpoint list is far smaller).
MAX_NAMES = 10_000


class SlotsExtension:
    """Answers ``obdask_slots_free`` (see the module docstring); stateless."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    @property
    def handlers(self) -> dict[str, Any]:
        """Scheduler handlers this extension answers."""
        return {"obdask_slots_free": self.free}

    def free(self, names: list[str] | None = None) -> list[int | None]:
        """Free leases of each semaphore in ``names``, in order.

        Parameters
        ----------
        names : list of str
            Semaphore names (at most :data:`MAX_NAMES` are answered).

        Returns
        -------
        list of int or None
            ``max_leases`` minus the leases held; None for a semaphore the
            scheduler does not know yet (nobody registered it: all its leases are free).
        """
        sems = self.scheduler.extensions.get("semaphores")
        out: list[int | None] = []
        for name in list(names or ())[:MAX_NAMES]:
            if sems is None or name not in sems.max_leases:
                out.append(None)
                continue
            # .get: ``leases`` is a defaultdict; a lookup must not add entries to it
            held = sems.leases.get(name) or ()
            out.append(max(0, int(sems.max_leases[name]) - len(held)))
        return out
