"""One run of a plan at a time per run-record store, with or without a shared scheduler.

Two ``obdask run plan.md`` on one machine each start their own embedded cluster, so the
scheduler cannot see both; the store they share can.  A run creates
``<records>/<plan_id>/running.lock`` exclusively (``O_EXCL`` on local disk, an exclusive
``x`` write where the fsspec filesystem offers one) and removes it when it ends.  A
second run waits up to ``obdask.run.busy-plan-wait`` for it, then refuses with the lock's
owner in the message.  A lock left by a run that died on this host (its process is gone)
is taken over; one from another host names itself so that it can be removed by hand.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import time
from typing import Any

from obdask.exceptions import ObdaskError
from obdask.stores import store_errors

logger = logging.getLogger(__name__)

LOCK_NAME = "running.lock"


class PlanBusy(ObdaskError, RuntimeError):
    """Another run of the same plan holds the run-record store."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of one run on its plan's records (see the module docstring).

    Parameters
    ----------
    store : obdask.records.RunStore
        The run's record store (its filesystem and plan folder).
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.path = posixpath.join(store.plan_root, LOCK_NAME)
        self.owner = {"run_id": store.run_id, "host": socket.gethostname(),
                      "pid": os.getpid(), "started": time.time()}
        self.held = False

    def _create(self) -> bool:
        with store_errors("records", self.store.url, "write"):
            return self._create_lock()

    def _create_lock(self) -> bool:
        fs, data = self.store.fs, json.dumps(self.owner).encode()
        fs.makedirs(self.store.plan_root, exist_ok=True)
        if self.store._local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            with fs.open(self.path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):
            # no exclusive create on this filesystem: check, then write (a short race)
            if fs.exists(self.path):
                return False
            fs.pipe_file(self.path, data)
            return True

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"damaged": True}

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None or holder.get("damaged"):
            return holder is not None
        return holder.get("host") == self.owner["host"] and not _alive(int(holder["pid"]))

    def acquire(self, wait: float) -> bool:
        """Take the lock, waiting up to ``wait`` seconds; raise :class:`PlanBusy` after.

        Returns whether another run held it first (the caller then re-reads what
        that run completed).
        """
        deadline = time.monotonic() + max(wait, 0)
        waited = False
        while True:
            if self._create():
                self.held = True
                return waited
            holder = self._holder()
            if self._stale(holder):
                logger.warning("taking over %s, left by a run that is gone: %s", self.path,
                               holder)
                self.store.fs.rm_file(self.path)
                continue
            if time.monotonic() >= deadline:
                who = holder or {}
                raise PlanBusy(
                    f"plan {self.store.plan_id!r} is already running (run {who.get('run_id')} "
                    f"of pid {who.get('pid')} on {who.get('host')}, lock {self.path}); wait "
                    "for it to finish, give this plan another plan_id=, or delete the lock if "
                    "that run is gone")
            waited = True
            time.sleep(0.2)

    def release(self) -> None:
        """Remove the lock if this run still holds it."""
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and holder.get("run_id") == self.owner["run_id"]:
            try:
                self.store.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
