"""The session driver: one long-running Dask task that advances one session.

:func:`obdask.session.task.drive` runs a :class:`Driver` on a worker (submitted by
:meth:`obdask.session.api.Session.start` or ``resume``, fire-and-forget, so it goes on
when the starting client leaves).  It
secedes (``worker_client``), takes the session's lease from the scheduler extension
(:mod:`obdask.server.sessions`), claims the durable record with that epoch and loops:

1. ask the orchestrator for the next move: a model task with the JSON-schema reply of
   ``state.reply_schema()``; a reply that breaks the navigation rules is asked again
   once (``obdask.llm.schema-retries``), then ``state.default_move()`` is taken and a
   note records it;
2. ``store.begin_call`` (a process already recorded is never run again; a call cut off
   by a crash is made again once, labelled re-spent), then a human consultation at
   Implement P3 (and Plan P2 with ``obdask.sessions.clarify``), then the process as a
   model task placed by its role;
3. ``store.record_tokens`` and ``store.append_process`` (durable), then the shared
   state and a ``transition`` event (extension).

Step 3 is written behind: queued to one writer thread, in order, while the next
orchestrator call runs (that call is never recorded, so a crash meanwhile costs only the
re-run of a process whose snapshot was not yet written, which the resume contract
allows: at most once, labelled re-spent).  The driver waits for the queue before its
next durable step (``begin_call``, or any other write), so the record keeps its order,
and a write's error (``LeaseLost`` included) is raised there.

Any write with a superseded epoch raises :class:`~obdask.exceptions.LeaseLost` out of
the task.  A resumed driver whose record shows a cut-off call (a ``calls/`` mark
without a snapshot) runs that same position again instead of asking anew.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from obdask.exceptions import BudgetExceeded, LeaseLost, ModelError, SessionError
from obdask.session.behind import WriteBehind
from obdask.session.events import TOKEN_STEP
from obdask.session.fragments import FragmentError, extract, run_fragment
from obdask.session.model import PROCESSES, Move, MoveKind, SessionState
from obdask.session.store import SessionStore

logger = logging.getLogger(__name__)

RESOURCES_EVERY = 5  # processes between resources.json writes (and at the end)
OUTPUT_LIMIT = 4000  # characters of the last process output shown to the next model call
QUESTION = ("Feedback on the work so far ({position}, {name}): is this what you want, and "
            "what should change?")


class InjectedCrash(RuntimeError):
    """Raised by a driver at a crash point a test asked for (``crash=``)."""


class CutOff(SessionError):
    """The driver's cluster went away under it (its client or worker is closing)."""


@dataclass
class Settings:
    """What a driver needs from the starting client's configuration (no global config
    on the worker is read: many drivers share a worker)."""

    store_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    endpoints: tuple[str, ...] = ()
    models: dict[str, str] = field(default_factory=dict)       # role -> model
    resources: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> needs
    workspace: str | None = None  # where plan fragments run (default: the worker's cwd)
    consultation_timeout: float = 60.0
    clarify: bool = False
    max_errors: int = 3
    max_tokens: int | None = None    # the session's token budget (None: no limit)
    max_time: float | None = None    # its wall-time budget from creation, seconds
    takeover: bool = False
    crash: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, store: SessionStore, **overrides: Any) -> Settings:
        from obdask import config
        from obdask.context import RunContext
        from obdask.placement import model_roles, role_resources

        endpoints, models = RunContext.llm_from_config()
        resources = {}
        for role in model_roles():
            try:
                resources[role] = role_resources(role)
            except Exception:  # noqa: BLE001 - a bad role entry fails where it is used
                resources[role] = {}
        max_tokens = config.get("sessions.max-tokens")
        max_time = config.get("sessions.max-time")
        return cls(store_url=store.url, storage_options=store.storage_options,
                   endpoints=tuple(endpoints), models=dict(models), resources=resources,
                   consultation_timeout=config.get_seconds("sessions.consultation-timeout"),
                   clarify=config.get_bool("sessions.clarify"),
                   max_errors=config.get_int("sessions.max-errors", minimum=0),
                   max_tokens=None if max_tokens is None else
                   config.get_int("sessions.max-tokens", minimum=1),
                   max_time=None if max_time is None else
                   config.get_seconds("sessions.max-time"), **overrides)


def run_model(model: str, messages: list[dict[str, Any]], endpoints: tuple[str, ...],
              fmt: Any = None, job: str | None = None, session: str | None = None,
              position: str | None = None) -> dict[str, Any]:
    """The model task: one :func:`~obdask.llm.client.call_model`; plain data back.

    ``session`` (``gen_ai.conversation.id``) and the ``position`` of the process the
    call is made for (``"S2P1"``) go into the call's token records.
    """
    from obdask.llm.client import call_model

    started = time.time()
    reply = call_model(model, messages, fmt=fmt, job=job, endpoints=list(endpoints) or None,
                       session=session, schedule=position[:2] if position else None,
                       process=position[2:] if position else None)
    return {"text": reply.text, "data": reply.data, "model": reply.model,
            "endpoint": reply.endpoint, "input_tokens": reply.prompt_eval_count,
            "output_tokens": reply.eval_count, "attempts": reply.attempts,
            "started": started, "ended": time.time()}


class Driver:
    """One driver run (see the module docstring); :func:`drive` is the task."""

    def __init__(self, session_id: str, settings: Settings, client: Any,
                 holder: str, key: str | None) -> None:
        self.sid = session_id
        self.s = settings
        self.client = client
        self.holder = holder
        self.key = key
        self.store = SessionStore(settings.store_url, settings.storage_options)
        self.epoch = 0
        self.cancel = False
        self.tokens = {"input": 0, "output": 0}
        self.next_mark = TOKEN_STEP
        self.time_split = {"agent": 0.0, "human": 0.0, "orchestrator": 0.0}
        self.per_process: dict[str, dict[str, int]] = {}
        self.served_locally = True
        self.prompt = ""
        self.last_output = ""
        self.ended = False  # the end (done, failed, cancelled) is recorded
        self.flow_code: str | None = None  # the last state recorded, for the result
        self.behind = WriteBehind(f"obdask-session-{session_id}")

    # -- scheduler calls -----------------------------------------------------------------
    def _rpc(self, op: str, **kwargs: Any) -> Any:
        scheduler = self.client.scheduler
        if scheduler is None:  # the client closed: the cluster is going away
            raise CutOff(f"session {self.sid}: the driver's client is closed ({op})")
        return self.client.sync(getattr(scheduler, op), **kwargs)

    def _share(self, state: dict[str, Any] | None = None,
               events: list[dict[str, Any]] | None = None) -> None:
        reply = self._rpc("obdask_session_update", session=self.sid, epoch=self.epoch,
                          state=state, events=events)
        if not reply.get("ok"):
            raise LeaseLost(reply.get("error") or "lease lost", session=self.sid,
                            epoch=self.epoch, highest=reply.get("highest"), kept=False)
        self.cancel = self.cancel or bool(reply.get("cancel"))

    def _shared_state(self, state: SessionState, status: str = "running",
                      question: dict[str, Any] | None = None) -> dict[str, Any]:
        info = state.info
        return {"state": "done" if state.finished else status, "flow_code": state.flow_code,
                "position": state.position, "process": info.name if info else None,
                "question": question, "tokens": dict(self.tokens),
                "processes": state.processes_run, "prompt": self.prompt}

    # -- model tasks ---------------------------------------------------------------------
    def _model_task(self, role: str, messages: list[dict[str, Any]], what: str,
                    fmt: Any = None, inline: bool = False,
                    position: str | None = None) -> dict[str, Any]:
        """A model call as a task placed by ``role``; ``inline``: in the driver's own
        thread when placement cannot matter (no worker serves models itself, so no
        role binds GPU/VRAM), which saves a task round trip (submit, run, result,
        release: 7-40 ms measured) on the critical path of every call.
        ``position``: the process the call is made for (none for the orchestrator)."""
        model = self.s.models.get(role, role)
        resources = (self.s.resources.get(role) or {}) if self.served_locally else {}
        job = f"session:{self.sid}:{what}"
        if inline and not self.served_locally:
            return run_model(model, messages, self.s.endpoints, fmt, job, self.sid, position)
        key = f"obdask-session-{self.sid}-{what}-{uuid.uuid4().hex[:8]}"
        future = self.client.submit(run_model, model, messages, self.s.endpoints, fmt,
                                    job, self.sid, position, key=key, pure=False,
                                    resources=resources or None)
        try:
            return future.result()
        finally:
            future.release()

    def _count(self, result: dict[str, Any], position: str | None = None) -> list[dict]:
        self.tokens["input"] += int(result.get("input_tokens") or 0)
        self.tokens["output"] += int(result.get("output_tokens") or 0)
        if position:
            per = self.per_process.setdefault(position, {"input": 0, "output": 0})
            per["input"] += int(result.get("input_tokens") or 0)
            per["output"] += int(result.get("output_tokens") or 0)
        total = self.tokens["input"] + self.tokens["output"]
        events = []
        while total >= self.next_mark:
            events.append({"kind": "tokens", "total": total, "mark": self.next_mark})
            self.next_mark += TOKEN_STEP
        return events

    # -- the orchestrator ----------------------------------------------------------------
    def _orchestrator_messages(self, state: SessionState) -> list[dict[str, Any]]:
        from obdask.llm.task import system_prompt

        legal = ", ".join(str(m) for m in state.legal_moves())
        text = (f"Session prompt: {self.prompt}\n\n"
                f"flow code: {state.flow_code or '-'}\n"
                f"position: {state.position}\n"
                f"where: {state.describe()}\n"
                f"legal moves: {legal}\n\n"
                "Rules: P1 -> P1|P2, P2 -> P1|P2|P3, P3 -> P2|P3|S1-S5 (end the schedule); "
                "'finish' only from Production P3 after all five schedules ran, with a "
                "justification that the goal is met.\n"
                f"Last process output:\n{self.last_output[-OUTPUT_LIMIT:] or '(none)'}\n\n"
                'Reply with JSON: {"move": <one of the legal moves>, "justification": "..."}')
        return [{"role": "system", "content": system_prompt("orchestrator")},
                {"role": "user", "content": text}]

    def choose(self, state: SessionState) -> tuple[Move, list[dict[str, Any]]]:
        """The orchestrator's move (asked again once), else the default move, recorded."""
        reasons: list[str] = []
        events: list[dict[str, Any]] = []
        for _ in range(2):
            t0 = time.monotonic()
            try:
                result = self._model_task("orchestrator", self._orchestrator_messages(state),
                                          f"orchestrate-{state.processes_run:04d}",
                                          fmt=state.reply_schema(), inline=True)
            except (ModelError, BudgetExceeded) as exc:  # e.g. the reply broke the schema twice
                reasons.append(str(exc))
                self.time_split["orchestrator"] += time.monotonic() - t0
                if isinstance(exc, BudgetExceeded):
                    events.append(self._budget_refused(exc, state.processes_run,
                                                       state.position, "orchestrator"))
                break
            self.time_split["orchestrator"] += time.monotonic() - t0
            events += self._count(result)
            try:
                move = Move.from_dict(result["data"])
                state.check(move)
                return move, events
            except ValueError as exc:
                reasons.append(str(exc))
        move = state.default_move()
        assert move is not None
        text = (f"the orchestrator gave no valid move at {state.position} "
                f"(flow code {state.flow_code or '-'}); took the default {move}: "
                + " | ".join(r[:300] for r in reasons))
        logger.warning("session %s: %s", self.sid, text)
        self.store.add_note(self.sid, self.epoch, text, source="driver",
                            index=state.processes_run, kind="default-move", move=str(move))
        events.append({"kind": "default-move", "at": state.position, "move": str(move),
                       "reasons": [r[:300] for r in reasons]})
        return move, events

    # -- humans --------------------------------------------------------------------------
    def consult(self, nxt: SessionState) -> dict[str, Any] | None:
        info = nxt.info
        assert info is not None
        if info.consultation is None or (info.consultation == "optional" and not self.s.clarify):
            return None
        index, position = nxt.processes_run, nxt.position
        c = self.store.ask(self.sid, self.epoch, index, position,
                           QUESTION.format(position=position, name=info.name),
                           timeout=self.s.consultation_timeout)
        if not c.open:  # settled before a crash: use what was recorded
            return {"question": c.question, "answer": c.answer, "source": c.source,
                    "timed_out": c.timed_out}
        self._crash(index, "after-ask")
        question = {"id": c.id, "position": position, "question": c.question,
                    "deadline": c.deadline, "asked": c.asked}
        self._share(self._shared_state(nxt, "waiting", question),
                    [{"kind": "consultation-asked", "position": position,
                      "question": c.question, "deadline": c.deadline}])
        t0 = time.monotonic()
        answer = None
        while answer is None and not self.cancel:
            left = c.time_left()
            if left <= 0:
                break
            reply = self._rpc("obdask_session_wait_answer", session=self.sid,
                              consultation=c.id, timeout=min(left, 5.0))
            answer = reply.get("answer")
            self.cancel = self.cancel or bool(reply.get("cancel"))
        self.time_split["human"] += time.monotonic() - t0
        if self.cancel:
            return None
        if answer is not None:
            settled = self.store.settle(self.sid, self.epoch, c.id, answer, source="human")
            event = {"kind": "consultation-answered", "position": position, "answer": answer}
        else:
            messages = [{"role": "system", "content": "The human did not answer in time. "
                         "Answer the question as a careful tech lead would, briefly."},
                        {"role": "user", "content": f"Session prompt: {self.prompt}\n\n"
                         f"Question: {c.question}\n\nWork so far:\n"
                         f"{self.last_output[-OUTPUT_LIMIT:]}"}]
            result = self._model_task("orchestrator", messages, f"answer-{index:04d}",
                                      inline=True)
            self._count(result)
            settled = self.store.settle(self.sid, self.epoch, c.id, result["text"],
                                        timed_out=True, substituted=True, source="model")
            event = {"kind": "consultation-timed-out", "position": position,
                     "substituted": result["text"][:500]}
        self._share(self._shared_state(nxt, "running"), [event])
        return {"question": c.question, "answer": settled.answer, "source": settled.source,
                "timed_out": settled.timed_out}

    # -- processes -----------------------------------------------------------------------
    def _process_messages(self, nxt: SessionState,
                          consultation: dict[str, Any] | None) -> list[dict[str, Any]]:
        from obdask.llm.task import system_prompt

        info = nxt.info
        assert info is not None
        text = (f"Session prompt: {self.prompt}\n\n"
                f"schedule: {info.schedule.title} (S{int(info.schedule)})\n"
                f"process: {info.name} (P{int(info.process)}): {info.purpose}\n"
                f"position: {nxt.position}\n"
                f"flow code: {nxt.flow_code}\n\n"
                f"Previous process output:\n{self.last_output[-OUTPUT_LIMIT:] or '(none)'}\n")
        if consultation:
            text += (f"\nHuman feedback ({consultation['source']}): "
                     f"{consultation['answer']}\n")
        return [{"role": "system", "content": system_prompt(info.role)},
                {"role": "user", "content": text}]

    def _crash(self, index: int, at: str) -> None:
        crash = self.s.crash
        if crash and int(crash.get("index", -1)) == index and crash.get("at") == at:
            raise InjectedCrash(f"session {self.sid}: injected crash {at} process {index}")

    def _resumed_move(self, record: Any, state: SessionState) -> Move | None:
        """The move of a process whose call was cut off (its position is in calls/)."""
        index = record.next_index
        cut = [c for c in record.calls if c.index == index]
        if not cut or state.finished:
            return None
        position = cut[-1].position
        s, p = int(position[1]), int(position[3])
        if state.schedule is not None and int(state.schedule) == s:
            move = Move.to_process(p)
            if state.is_legal(move):
                return move
        move = Move.enter(s)
        return move if p == 1 and state.is_legal(move) else None

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.behind.close()

    def _run(self) -> dict[str, Any]:
        reply = self._rpc("obdask_session_acquire", session=self.sid, holder=self.holder,
                          key=self.key, at_least=self.store.highest_epoch(self.sid),
                          takeover=self.s.takeover)
        if not reply.get("ok"):
            raise SessionError(reply.get("error") or f"session {self.sid}: no lease")
        self.epoch = int(reply["epoch"])
        record = self.store.claim(self.sid, self.epoch)
        record.check_resumable()
        self.prompt = record.prompt or ""
        state = record.state
        if record.last is not None:
            self.last_output = str(record.last.payload.get("output") or "")
        for t in record.tokens:
            self.tokens["input"] += int(t.get("input_tokens") or 0)
            self.tokens["output"] += int(t.get("output_tokens") or 0)
        self.next_mark = ((self.tokens["input"] + self.tokens["output"]) // TOKEN_STEP + 1
                          ) * TOKEN_STEP
        try:
            from obdask.placement import cluster_view

            view = self.client.sync(cluster_view, self.client)
            self.served_locally = view.models_served_locally
        except Exception:  # noqa: BLE001 - placement info is an optimisation here
            self.served_locally = False
        started = time.time()
        if record.stored_status == "cancelled":  # cancelled before this driver started
            self._share(self._shared_state(state, "cancelled"),
                        [{"kind": "session-complete", "flow_code": state.flow_code,
                          "duration": 0.0, "success": False, "status": "cancelled",
                          "epoch": self.epoch}])
            return {"id": self.sid, "state": "cancelled", "flow_code": state.flow_code,
                    "epoch": self.epoch}
        resumed = record.last is not None or bool(record.calls)
        self.store.update(self.sid, self.epoch, status="running")
        self._share(self._shared_state(state),
                    [{"kind": "session-start", "prompt": self.prompt, "epoch": self.epoch,
                      "resumed": resumed, "after": record.last.index if record.last else 0}])
        errors = state.errors
        pending = self._resumed_move(record, state)
        status = "done"
        # events of the move that ends the session: published with session-complete, in
        # the one update that shows the ended state (a client that sees it ended finds
        # every event, and the record, complete)
        closing: list[dict[str, Any]] = []
        while not state.finished:
            if self.cancel:
                status = "cancelled"
                break
            exhausted = self._budget_exhausted(record.created, state)
            if exhausted is not None:
                status, closing = "failed", [exhausted]
                break
            if pending is not None:
                move, events = pending, []
                pending = None
            else:
                move, events = self.choose(state)  # the last process's record meanwhile
            self.behind.settle()
            if self.cancel:
                status = "cancelled"
                break
            if move.kind is MoveKind.FINISH:
                state = state.apply(move)
                self.store.update(self.sid, self.epoch, state=state)
                closing = events
                break
            nxt = state.apply(move)
            index, position = nxt.processes_run, nxt.position
            self._crash(index, "before-call")
            ticket = self.store.begin_call(self.sid, self.epoch, index, position)
            consultation = self.consult(nxt)
            if self.cancel:
                status = "cancelled"
                break
            t0 = time.monotonic()
            info = PROCESSES[(nxt.schedule, nxt.process)]  # type: ignore[index]
            try:
                result = self._model_task(info.role, self._process_messages(nxt, consultation),
                                          f"{index:04d}-{position}", position=position,
                                          inline=True)
            except (ModelError, BudgetExceeded) as exc:
                self.time_split["agent"] += time.monotonic() - t0
                state, errors, closing = self._failed(state, index, position, exc, errors,
                                                      events)
                if closing:
                    status = "failed"
                    break
                continue
            self.time_split["agent"] += time.monotonic() - t0
            self._crash(index, "after-call")
            events += self._count(result, position)
            self.behind.put(functools.partial(
                self.store.record_tokens, self.sid, self.epoch, ticket,
                model=result["model"], input_tokens=result["input_tokens"],
                output_tokens=result["output_tokens"], role=info.role,
                endpoint=result["endpoint"], conversation_id=self.sid))
            try:
                fragment = self._fragment(result["text"], index, position)
            except FragmentError as exc:
                state, errors, closing = self._failed(state, index, position, exc, errors,
                                                      events)
                if closing:
                    status = "failed"
                    break
                continue
            if fragment is not None:
                events.append({"kind": "plan-fragment", "position": position, "index": index,
                               **{k: fragment[k] for k in ("plan_id", "run_id", "ok")},
                               "jobs": [{"step": j["step"], "status": j["status"]}
                                        for j in fragment["jobs"][:50]]})
            payload = {"output": result["text"], "role": info.role, "model": result["model"],
                       "endpoint": result["endpoint"], "move": move.to_dict(),
                       "tokens": {"input": result["input_tokens"],
                                  "output": result["output_tokens"]},
                       "respent": ticket.respent, "attempt": ticket.attempt,
                       "consultation": consultation, "fragment": fragment}
            self.last_output = result["text"]
            events.append({"kind": "transition", "from": state.position, "to": position,
                           "process": info.name, "index": index,
                           "duration": result["ended"] - result["started"],
                           "tokens": result["input_tokens"] + result["output_tokens"],
                           "respent": ticket.respent})
            self.behind.put(functools.partial(
                self._record, nxt, payload, result, events,
                self._resources() if index % RESOURCES_EVERY == 0 else None))
            state = nxt
        self.behind.settle()
        if status == "cancelled":
            self.store.update(self.sid, self.epoch, status="cancelled")
        self.ended, self.flow_code = True, state.flow_code
        self._write_resources()
        final = {"kind": "session-complete", "flow_code": state.flow_code,
                 "duration": time.time() - started, "success": status == "done",
                 "status": status, "epoch": self.epoch}
        self._share(self._shared_state(state, status), closing + [final])
        return {"id": self.sid, "state": status, "flow_code": state.flow_code,
                "epoch": self.epoch}

    def _record(self, nxt: SessionState, payload: dict[str, Any], result: dict[str, Any],
                events: list[dict[str, Any]], resources: dict[str, Any] | None) -> None:
        """Write behind: the process's snapshot, the resources every few processes, then
        the shared state and the events (in the writer thread; see the docstring)."""
        self.store.append_process(self.sid, self.epoch, nxt, payload,
                                  started=result["started"], ended=result["ended"])
        self._crash(nxt.processes_run, "after-record")
        self.flow_code = nxt.flow_code
        if resources is not None:
            self.store.set_resources(self.sid, self.epoch, resources)
        self._share(self._shared_state(nxt), events)

    def _budget_refused(self, exc: BudgetExceeded, index: int, position: str,
                        caller: str) -> dict[str, Any]:
        """Record that a cluster budget refused a call; the event to publish."""
        self.store.add_note(self.sid, self.epoch, str(exc), source="driver", index=index,
                            kind="budget-refused", caller=caller)
        return {"kind": "budget-refused", "position": position, "index": index,
                "caller": caller, "error": str(exc)[:500]}

    def _budget_exhausted(self, created: float | None,
                          state: SessionState) -> dict[str, Any] | None:
        """Whether the session's own token or time budget is spent: if so it is
        recorded (a note, status failed) and its ``budget-exhausted`` event returned
        (published with session-complete); None while there is budget left."""
        used_tokens = self.tokens["input"] + self.tokens["output"]
        elapsed = time.time() - float(created or time.time())
        over = None
        if self.s.max_tokens is not None and used_tokens >= self.s.max_tokens:
            over = ("tokens", used_tokens, self.s.max_tokens)
        elif self.s.max_time is not None and elapsed >= self.s.max_time:
            over = ("time", round(elapsed, 3), self.s.max_time)
        if over is None:
            return None
        self.behind.settle()  # the record in order: the last process first
        budget, used, limit = over
        text = (f"session {self.sid}: its {budget} budget is spent ({used} of {limit}, "
                f"obdask.sessions.max-{budget}) at {state.position} (flow code "
                f"{state.flow_code or '-'}); stopping")
        logger.warning("%s", text)
        self.store.add_note(self.sid, self.epoch, text, source="driver",
                            index=state.processes_run, kind="budget-exhausted", budget=budget)
        self.store.update(self.sid, self.epoch, status="failed", error=text)
        return {"kind": "budget-exhausted", "budget": budget, "used": used, "limit": limit,
                "position": state.position}

    def _failed(self, state: SessionState, index: int, position: str, exc: Exception,
                errors: int, events: list[dict[str, Any]]
                ) -> tuple[SessionState, int, list[dict[str, Any]]]:
        """Record an ``X`` for process ``index`` (its call or its fragment failed);
        returns the new state, the error count and, when that failed the session, the
        events to publish with session-complete (else they are published now)."""
        self.behind.settle()  # the record in order: the last process first
        if isinstance(exc, BudgetExceeded):
            events = events + [self._budget_refused(exc, index, position, "process")]
        state = state.error()
        errors += 1
        self.store.update(self.sid, self.epoch, state=state)
        self.store.add_note(self.sid, self.epoch, str(exc), source="driver",
                            index=index, kind="process-error")
        events = events + [{"kind": "process-error", "position": position,
                            "error": str(exc)[:500]}]
        if errors > self.s.max_errors:  # durable first: a client that sees "failed"
            self.store.update(self.sid, self.epoch, status="failed")  # finds it recorded
            return state, errors, events
        self._share(self._shared_state(state), events)
        return state, errors, []

    def _fragment(self, text: str, index: int, position: str) -> dict[str, Any] | None:
        """Run the plan fragment in a process's reply, if any (FragmentError if it
        does not compile); its run records go beside the session's record."""
        import os

        fragment = extract(text)
        if fragment is None:
            return None
        base = f"{self.store.url.rstrip('/')}/{self.sid}/fragments"
        result = run_fragment(self.client, fragment, session_id=self.sid, index=index,
                              position=position, workspace=self.s.workspace or os.getcwd(),
                              records=f"{base}/records", artifacts=f"{base}/artifacts")
        self.store.add_action(self.sid, self.epoch, {
            "kind": "plan-fragment", "position": position,
            **{k: result[k] for k in ("plan_id", "run_id", "records", "ok", "jobs_total")}},
            index=index)
        return result

    def _resources(self) -> dict[str, Any]:
        """The resource statistics now (a copy: the writer thread may write it later)."""
        return {"tokens": dict(self.tokens),
                "tokens_per_process": {p: dict(t) for p, t in self.per_process.items()},
                "time_split": {k: round(v, 6) for k, v in self.time_split.items()}}

    def _write_resources(self) -> None:
        self.store.set_resources(self.sid, self.epoch, self._resources())
