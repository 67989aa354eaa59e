"""Scheduler extension: why a job or a session is not running yet (``obdask why``).

:class:`WaitingExtension` answers ``obdask_why_get(key)`` from the scheduler's
real state, read-only:

* a job (``plan::step``, or a raw Dask key) the scheduler holds:

  - ``waiting`` on dependencies (which, and their states);
  - ``no-worker``: no worker has the resources, lane or host it asks for (which);
  - ``queued``: every worker is saturated (Dask's root-task queueing);
  - ``processing`` but not executing on a worker whose threads are taken: the
    warm worker it was routed to is busy (who runs there);
  - executing but blocked inside: a token budget without room (the budget
    extension's waiting reservations: which budget, when its window frees) or
    a per-model concurrency cap (the slot notes running tasks send: who holds
    the slots);

* a session (its id, as in :mod:`obdask.server.sessions`): waiting for a human
  answer (question and deadline), its lease held by another driver, or its
  driver task itself waiting (explained as a job).

Running tasks tell what they wait for and hold over the worker's batched stream
(``obdask_why_note``, see :mod:`obdask.waiting`); notes are dropped when the
task leaves ``processing`` and are bounded in number.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from obdask.keys import as_key, job_id_of

logger = logging.getLogger(__name__)

NOTE_OP = "obdask_why_note"
#: Running tasks whose notes are kept at most (oldest dropped first).
MAX_NOTES = 10_000
#: Dependencies listed by name at most in one answer.
MAX_LISTED = 20


def _name(key: Any) -> str:
    return job_id_of(key) or str(key)


class WaitingExtension:
    """Answers ``obdask_why_get`` (see the module docstring)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        #: ``{task key: {"waiting": {...}, "holds": {...}}}`` of running tasks.
        self.notes: OrderedDict[Any, dict[str, Any]] = OrderedDict()

    @property
    def handlers(self) -> dict[str, Any]:
        """Scheduler handlers this extension answers."""
        return {"obdask_why_get": self.why}

    @property
    def stream_handlers(self) -> dict[str, Any]:
        """Worker stream handler: running tasks' notes."""
        return {NOTE_OP: self._note}

    # -- notes from running tasks ------------------------------------------------------
    def _note(self, key: Any = None, kind: str = "", value: Any = None, **_: Any) -> None:
        try:
            self.note(as_key(key), kind, value)
        except Exception:  # an exception here would close the worker's stream
            logger.exception("obdask: bad why note %r %r", key, kind)

    def note(self, key: Any, kind: str, value: dict[str, Any] | None) -> None:
        """Set (or with None clear) what task ``key`` waits for or holds."""
        if value is None:
            entry = self.notes.get(key)
            if entry is not None:
                entry.pop(kind, None)
                if not entry:
                    del self.notes[key]
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None or ts.state != "processing":
            return
        entry = self.notes.setdefault(key, {})
        entry[kind] = {**value, "since": time.time()}
        if kind == "holds":  # it got what it waited for
            entry.pop("waiting", None)
        self.notes.move_to_end(key)
        while len(self.notes) > MAX_NOTES:
            self.notes.popitem(last=False)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Forget the notes of a task that stopped running."""
        if start == "processing" and self.notes:
            self.notes.pop(key, None)

    # -- the answer --------------------------------------------------------------------
    def find(self, key: Any) -> Any:
        """The scheduler's TaskState for a job id (``plan::step``) or a Dask key."""
        tasks = self.scheduler.tasks
        key = as_key(key)
        ts = tasks.get(key)
        if ts is not None or not isinstance(key, str):
            return ts
        for k, ts in list(tasks.items()):
            if job_id_of(k) == key:
                return ts
        return None

    def why(self, key: Any) -> dict[str, Any]:
        """Handler ``obdask_why_get``: ``{"key", "what", "state", "reasons": [...]}``.

        Each reason is a dict with ``cause`` and a one-line ``message`` plus
        the details of that cause.  ``what`` is ``job``, ``session`` or
        ``unknown`` (neither a task nor a session the scheduler holds).
        """
        host = self.scheduler.extensions.get("obdask")
        sessions = getattr(host, "extensions", {}).get("sessions")
        if isinstance(key, str) and sessions is not None and key in sessions.sessions:
            return self._why_session(key, sessions.sessions[key])
        ts = self.find(key)
        if ts is None:
            return {"key": key, "what": "unknown", "state": None, "reasons": [{
                "cause": "unknown",
                "message": f"{key!r} is neither a job nor a session this scheduler holds "
                           "(finished and forgotten, or never submitted)"}]}
        return {"key": _name(ts.key), "what": "job", "state": ts.state,
                "reasons": self.task_reasons(ts)}

    def waiting(self, limit: int = 50) -> list[dict[str, Any]]:
        """Up to ``limit`` things not running and why (the dashboard's Waiting table).

        Reads only bounded sets: the scheduler's unrunnable and queued tasks,
        tasks blocked on a budget or a slot, and the sessions; jobs waiting on
        dependencies are one summary row per count (there may be many).
        """
        rows: list[dict[str, Any]] = []
        host = self.scheduler.extensions.get("obdask")
        exts = getattr(host, "extensions", {})
        candidates = list(self.scheduler.unrunnable)[:limit]
        candidates += list(self.scheduler.queued.peekn(limit)) if self.scheduler.queued else []
        blocked = getattr(exts.get("budgets"), "blocked", {})
        candidates += [self.scheduler.tasks[k] for k in list(blocked)[:limit]
                       if k in self.scheduler.tasks]
        candidates += [self.scheduler.tasks[k] for k, n in list(self.notes.items())[-limit:]
                       if "waiting" in n and k in self.scheduler.tasks]
        for ts in candidates:
            reason = self.task_reasons(ts)[0]
            rows.append({"what": "job", "key": _name(ts.key), "state": ts.state, **reason})
        sessions = exts.get("sessions")
        for sid, entry in list(getattr(sessions, "sessions", {}).items())[-limit:]:
            if entry.get("question") or (entry.get("pending") and entry.get("state") != "done"):
                reason = self._why_session(sid, entry)["reasons"][0]
                rows.append({"what": "session", "key": sid, "state": entry.get("state"),
                             **reason})
        metrics = exts.get("metrics")
        held = metrics.held_states() if metrics is not None else {}
        if held.get("waiting"):
            rows.append({"what": "jobs", "key": "-", "state": "waiting",
                         "cause": "dependencies",
                         "message": f"{held['waiting']} jobs wait on dependencies"})
        return rows[:limit]

    def task_reasons(self, ts: Any) -> list[dict[str, Any]]:
        """Why the task ``ts`` is not running (or that it runs)."""
        state = ts.state
        if state == "waiting":
            return [self._dependencies(ts)]
        if state == "no-worker":
            return [self._no_worker(ts)]
        if state == "queued":
            return [{"cause": "queued", "message": (
                f"{_name(ts.key)} is queued: every worker's threads are busy "
                f"({len(self.scheduler.workers)} workers); it starts when one frees")}]
        if state == "processing":
            return self._processing(ts)
        if state in ("memory", "erred", "released", "forgotten"):
            return [{"cause": "finished" if state != "released" else "released",
                     "message": f"{_name(ts.key)} is not waiting: it is {state}"}]
        return [{"cause": state, "message": f"{_name(ts.key)} is {state}"}]

    def _dependencies(self, ts: Any) -> dict[str, Any]:
        deps = sorted(ts.waiting_on or (), key=lambda d: str(d.key))
        listed = [{"key": _name(d.key), "state": d.state} for d in deps[:MAX_LISTED]]
        shown = ", ".join(f"{d['key']} ({d['state']})" for d in listed)
        more = f" and {len(deps) - MAX_LISTED} more" if len(deps) > MAX_LISTED else ""
        return {"cause": "dependencies", "waiting_on": listed, "count": len(deps),
                "message": f"{_name(ts.key)} waits on {len(deps)} dependenc"
                           f"{'y' if len(deps) == 1 else 'ies'}: {shown}{more}"}

    def _no_worker(self, ts: Any) -> dict[str, Any]:
        workers = self.scheduler.workers.values()
        missing: dict[str, float] = {}
        for resource, amount in (ts.resource_restrictions or {}).items():
            best = max((ws.resources.get(resource, 0) for ws in workers), default=0)
            if best < amount:
                missing[resource] = amount
        parts = []
        for r, a in missing.items():
            has = any(r in ws.resources for ws in workers)
            parts.append(f"{r}={a:g} (no worker has {'that much' if has else 'it'})")
        gone = [w for w in (ts.worker_restrictions or ()) if w not in self.scheduler.workers]
        if ts.worker_restrictions and not ts.loose_restrictions and len(gone) == len(
                ts.worker_restrictions):
            parts.append(f"workers {sorted(gone)} (none in the cluster)")
        if ts.host_restrictions and not ts.loose_restrictions:
            parts.append(f"hosts {sorted(ts.host_restrictions)}")
        lanes = sorted(r for r in missing if r.startswith("lane-"))
        what = ", ".join(parts) or "its restrictions"
        return {"cause": "no-worker", "resources": missing, "lanes": lanes,
                "workers": sorted(ts.worker_restrictions or ()),
                "message": f"{_name(ts.key)} has no worker to run on: it asks for {what}"}

    def _processing(self, ts: Any) -> list[dict[str, Any]]:
        reasons = []
        ws = ts.processing_on
        executing = getattr(ws, "executing", {}) or {}
        notes = self.notes.get(ts.key, {})
        budget = self._budget_wait(ts.key)
        if budget is not None:
            reasons.append(budget)
        wait = notes.get("waiting")
        if wait and wait.get("cause") == "slots":
            reasons.append(self._slots(ts, wait))
        if not reasons and ws is not None and ts not in executing and len(executing) >= max(
                1, ws.nthreads):
            routed = bool(ts.worker_restrictions) and ws.address in ts.worker_restrictions
            busy = [_name(t.key) for t in list(executing)[:MAX_LISTED]]
            reasons.append({
                "cause": "warm-worker-busy" if routed else "worker-busy",
                "worker": ws.address, "running": busy,
                "message": f"{_name(ts.key)} waits for {'its warm worker' if routed else 'worker'} "
                           f"{ws.address}: its {ws.nthreads} thread(s) run {', '.join(busy)}"})
        if not reasons:
            reasons.append({"cause": "running", "worker": getattr(ws, "address", None),
                            "message": f"{_name(ts.key)} is running on "
                                       f"{getattr(ws, 'address', '?')}"})
        return reasons

    def _budget_wait(self, key: Any) -> dict[str, Any] | None:
        host = self.scheduler.extensions.get("obdask")
        budgets = getattr(host, "extensions", {}).get("budgets")
        blocked = getattr(budgets, "blocked", {}).get(key) if budgets is not None else None
        if not blocked:
            return None
        wake = blocked.get("wake_at")
        when = (f"; its window frees tokens in {max(0.0, wake - time.time()):.0f}s"
                if wake else "; it frees when a reservation is settled or released")
        return {"cause": "budget", "budget": blocked.get("budget"), "wake_at": wake,
                "message": f"{_name(key)} waits for token budget {blocked.get('budget')!r}: "
                           f"{blocked.get('message', 'no room')}{when}"}

    def _slots(self, ts: Any, wait: dict[str, Any]) -> dict[str, Any]:
        model = wait.get("model")
        holders = [{"key": _name(k), "url": n["holds"].get("url")}
                   for k, n in self.notes.items()
                   if "holds" in n and n["holds"].get("model") == model and k != ts.key]
        who = ", ".join(f"{h['key']} on {h['url']}" for h in holders) or "tasks not reporting"
        return {"cause": "slots", "model": model, "urls": wait.get("urls"),
                "holders": holders,
                "message": f"{_name(ts.key)} waits for a slot of model {model!r} "
                           f"(per-model concurrency cap full): held by {who}"}

    def _why_session(self, sid: str, entry: dict[str, Any]) -> dict[str, Any]:
        reasons = []
        question = entry.get("question")
        if question:
            deadline = question.get("deadline")
            reasons.append({"cause": "human", "question": question.get("question"),
                            "deadline": deadline,
                            "message": f"session {sid} waits for a human answer to "
                                       f"{question.get('question')!r}"
                                       + (f" (deadline {_when(deadline)})" if deadline else "")
                                       + f"; answer with obdask session answer {sid}"})
        pending = entry.get("pending")
        if entry.get("holder") is not None and pending and pending != entry.get("key"):
            reasons.append({"cause": "lease", "holder": entry["holder"],
                            "epoch": entry["epoch"], "driver": str(entry.get("key")),
                            "message": f"session {sid}: driver {pending} cannot start, the "
                                       f"lease is held by another driver ({entry.get('key')} "
                                       f"on {entry['holder']}, epoch {entry['epoch']})"})
        elif pending and entry.get("holder") is None:
            ts = self.find(pending)
            if ts is not None:
                for reason in self.task_reasons(ts):
                    reason = dict(reason)
                    reason["message"] = f"session {sid}: driver " + reason["message"]
                    reasons.append(reason)
        if not reasons:
            state = entry.get("state")
            reasons.append({"cause": state or "unknown",
                            "message": f"session {sid} is {state}"
                                       + (f", at process {entry['process']}"
                                          if entry.get("process") else "")})
        return {"key": sid, "what": "session", "state": entry.get("state"),
                "process": entry.get("process"), "reasons": reasons}


def _when(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))
    except (TypeError, ValueError):
        return str(ts)
