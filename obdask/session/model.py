"""The session state machine: 5 schedules x 3 processes, navigation rules, flow codes.

Pure Python, no Dask.  A session answers one prompt by moving through
schedules (Knowledge, Plan, Implement, Scale, Production), each made of three
processes P1, P2, P3 (``docs/sessions.md``; spec: ollamabot-concepts.md section 3).

Rules, as moves from a :class:`SessionState`:

* Nothing started: the only moves enter a schedule (``S1`` .. ``S5``), at its P1.
* Inside a schedule, strict adjacency: P1 -> P1 | P2; P2 -> P1 | P2 | P3;
  P3 -> P2 | P3 | end the schedule.
* A schedule ends only after P3: from P3, ``Sk`` ends the current schedule and
  enters schedule k (any k, the same one again included) at P1.
* ``finish`` ends the prompt: only from Production P3 (Production ends last),
  only when every other schedule has ended at least once, and only with a
  non-blank justification from the orchestrator that the goal is met.

An error is not a move: :meth:`SessionState.error` records an ``X`` in the
flow code at the current position and leaves the position as it was.

Flow codes: ``S1P123S2P12`` = schedule 1 ran P1, P2, P3, then schedule 2 ran
P1, P2; ``X`` marks an error at that point (``S1P1XP2``: an error after P1,
then P2).  A process digit follows a ``P`` unless it directly follows another
process digit.  The code does not say whether the prompt has finished (the
session record does).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from obdask.exceptions import FlowCodeError, InvalidTransition

logger = logging.getLogger(__name__)

__all__ = [
    "Event",
    "Move",
    "MoveKind",
    "Process",
    "ProcessInfo",
    "Schedule",
    "SessionState",
    "build_flow_code",
    "parse_flow_code",
    "process_info",
]


class Schedule(enum.IntEnum):
    """The five schedules, in the spec's order (their number is the ``Sn`` of flow codes)."""

    KNOWLEDGE = 1
    PLAN = 2
    IMPLEMENT = 3
    SCALE = 4
    PRODUCTION = 5

    @property
    def title(self) -> str:
        """The schedule's name as the spec writes it (``"Knowledge"``)."""
        return self.name.capitalize()


class Process(enum.IntEnum):
    """The three processes of every schedule (their number is the digit after ``P``)."""

    P1 = 1
    P2 = 2
    P3 = 3


@dataclass(frozen=True)
class ProcessInfo:
    """What one process of one schedule is.

    Attributes
    ----------
    schedule, process
        Where it sits.
    name
        The spec's name (``"Research"``, ``"Clarify"``, ...).
    purpose
        One line on what it does.
    role
        The model role that executes it by default (``researcher`` or ``coder``;
        the ``orchestrator`` only chooses moves and never executes a process).
    consultation
        ``"optional"`` (Plan P2), ``"mandatory"`` (Implement P3) or None.
    """

    schedule: Schedule
    process: Process
    name: str
    purpose: str
    role: str
    consultation: str | None = None

    @property
    def position(self) -> str:
        """``"S2P2"``."""
        return f"S{int(self.schedule)}P{int(self.process)}"


_TABLE: dict[tuple[int, int], tuple[str, str, str | None]] = {
    (1, 1): ("Research", "find gaps in what is known", None),
    (1, 2): ("Crawl", "extract details", None),
    (1, 3): ("Retrieve", "structure the findings", None),
    (2, 1): ("Brainstorm", "collect approaches", None),
    (2, 2): ("Clarify", "settle open questions (optional human consultation)", "optional"),
    (2, 3): ("Plan", "write concrete steps", None),
    (3, 1): ("Implement", "write the code", None),
    (3, 2): ("Verify", "tests, lint, build", None),
    (3, 3): ("Feedback", "mandatory human consultation", "mandatory"),
    (4, 1): ("Scale", "find bottlenecks", None),
    (4, 2): ("Benchmark", "measure", None),
    (4, 3): ("Optimize", "remove the bottlenecks", None),
    (5, 1): ("Analyze", "security, dependencies", None),
    (5, 2): ("Systemize", "patterns, docs", None),
    (5, 3): ("Harmonize", "integration, polish", None),
}

PROCESSES: dict[tuple[Schedule, Process], ProcessInfo] = {
    (Schedule(s), Process(p)): ProcessInfo(
        Schedule(s), Process(p), name, purpose,
        "researcher" if s == Schedule.KNOWLEDGE else "coder", consultation)
    for (s, p), (name, purpose, consultation) in _TABLE.items()
}

# Strict adjacency inside a schedule.
_NEXT_PROCESS: dict[Process, tuple[Process, ...]] = {
    Process.P1: (Process.P1, Process.P2),
    Process.P2: (Process.P1, Process.P2, Process.P3),
    Process.P3: (Process.P2, Process.P3),
}

DEFAULT_JUSTIFICATION = ("default move: every schedule ran at least once and Production "
                         "ended last")


def process_info(schedule: int, process: int) -> ProcessInfo:
    """The :class:`ProcessInfo` of ``schedule`` (1-5) and ``process`` (1-3)."""
    return PROCESSES[(Schedule(schedule), Process(process))]


class MoveKind(str, enum.Enum):
    """What a move does: run a process, end the schedule and enter one, or finish."""

    PROCESS = "process"
    SCHEDULE = "schedule"
    FINISH = "finish"


@dataclass(frozen=True)
class Move:
    """One navigation choice of the orchestrator.

    Written ``"P2"`` (run process 2 of the current schedule), ``"S3"`` (end the
    current schedule, after P3, and enter schedule 3 at P1) or ``"finish"``
    (end the prompt; needs a justification).  The justification does not take
    part in equality: ``Move.finish() == Move.finish("why")``.
    """

    kind: MoveKind
    target: int = 0
    justification: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        kind = MoveKind(self.kind)
        object.__setattr__(self, "kind", kind)
        if kind is MoveKind.PROCESS:
            if self.target not in (1, 2, 3):
                raise ValueError(f"P{self.target} is not a process (P1-P3)")
            object.__setattr__(self, "target", Process(self.target))
        elif kind is MoveKind.SCHEDULE:
            if self.target not in (1, 2, 3, 4, 5):
                raise ValueError(f"S{self.target} is not a schedule (S1-S5)")
            object.__setattr__(self, "target", Schedule(self.target))
        else:
            object.__setattr__(self, "target", 0)
        object.__setattr__(self, "justification", str(self.justification or ""))

    @classmethod
    def to_process(cls, process: int) -> Move:
        """Run ``process`` (1-3) of the current schedule."""
        return cls(MoveKind.PROCESS, int(process))

    @classmethod
    def enter(cls, schedule: int) -> Move:
        """End the current schedule (if any, after P3) and enter ``schedule`` (1-5) at P1."""
        return cls(MoveKind.SCHEDULE, int(schedule))

    @classmethod
    def finish(cls, justification: str = "") -> Move:
        """End the prompt, with the orchestrator's justification that the goal is met."""
        return cls(MoveKind.FINISH, 0, justification)

    @classmethod
    def parse(cls, text: str, justification: str = "") -> Move:
        """``"P2"``, ``"S3"`` or ``"finish"`` (any case) to a :class:`Move`.

        Raises
        ------
        ValueError
            For anything else, naming what was given.
        """
        if not isinstance(text, str):
            raise ValueError(f"a move is a string like 'P2', 'S3' or 'finish', not {text!r}")
        word = text.strip().upper()
        if word == "FINISH":
            return cls.finish(justification)
        if len(word) == 2 and word[0] in "PS" and word[1].isdigit():
            if word[0] == "P":
                return cls.to_process(int(word[1]))
            return cls.enter(int(word[1]))
        raise ValueError(f"{text!r} is not a move (use P1-P3, S1-S5 or finish)")

    @classmethod
    def from_dict(cls, reply: dict[str, Any]) -> Move:
        """A move from the orchestrator's structured reply ``{"move": "P2", ...}``."""
        if not isinstance(reply, dict) or "move" not in reply:
            raise ValueError(f"a move reply is an object with a 'move' key, not {reply!r}")
        return cls.parse(reply["move"], str(reply.get("justification") or ""))

    def to_dict(self) -> dict[str, Any]:
        """``{"move": "P2"}`` (plus ``"justification"`` when one is set)."""
        out: dict[str, Any] = {"move": str(self)}
        if self.justification:
            out["justification"] = self.justification
        return out

    def __repr__(self) -> str:
        if self.justification:
            return f"Move({str(self)!r}, justification={self.justification!r})"
        return f"Move({str(self)!r})"

    def __str__(self) -> str:
        if self.kind is MoveKind.PROCESS:
            return f"P{int(self.target)}"
        if self.kind is MoveKind.SCHEDULE:
            return f"S{int(self.target)}"
        return "finish"


@dataclass(frozen=True)
class Event:
    """One entry of a session's path: ``S`` (enter schedule n), ``P`` (ran process n), ``X``."""

    kind: str
    value: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("S", "P", "X"):
            raise ValueError(f"event kind {self.kind!r} is not S, P or X")


def build_flow_code(events: tuple[Event, ...] | list[Event]) -> str:
    """The flow code of a path: ``S1P123S2P12``; ``X`` where an error was recorded."""
    out: list[str] = []
    previous = ""
    for event in events:
        if event.kind == "S":
            out.append(f"S{event.value}")
        elif event.kind == "P":
            out.append(f"{event.value}" if previous == "P" else f"P{event.value}")
        else:
            out.append("X")
        previous = event.kind
    return "".join(out)


def parse_flow_code(code: str) -> tuple[Event, ...]:
    """The path a flow code records (syntax only; :meth:`SessionState.from_flow_code` checks
    the navigation rules too).

    Also reads the form with a ``P`` before every process (``S1P1P2P3``).

    Raises
    ------
    FlowCodeError
        Naming the character and its position.
    """
    if not isinstance(code, str):
        raise FlowCodeError(f"a flow code is a string, not {code!r}")
    events: list[Event] = []
    i, n = 0, len(code)
    in_run = False  # the previous character was a process digit or a 'P'

    def bad(at: int, why: str) -> FlowCodeError:
        char = code[at] if at < n else "end"
        return FlowCodeError(f"flow code {code!r}: {char!r} at position {at + 1}: {why}")

    while i < n:
        c = code[i]
        if c == "S":
            if i + 1 >= n or code[i + 1] not in "12345":
                raise bad(i + 1, "S is followed by a schedule number 1-5")
            if code[i + 2:i + 4] != "P1":
                raise bad(i + 2, f"schedule S{code[i + 1]} starts at P1")
            events += [Event("S", int(code[i + 1])), Event("P", 1)]
            i += 4
            in_run = True
        elif c == "P":
            if i + 1 >= n or code[i + 1] not in "123":
                raise bad(i + 1, "P is followed by a process number 1-3")
            if not events or all(e.kind == "X" for e in events):
                raise bad(i, "a process outside any schedule (no schedule started)")
            events.append(Event("P", int(code[i + 1])))
            i += 2
            in_run = True
        elif c in "123" and in_run:
            events.append(Event("P", int(c)))
            i += 1
        elif c == "X":
            events.append(Event("X"))
            i += 1
            in_run = False
        else:
            raise bad(i, "expected S<n>, P<n>, a process digit 1-3 or X")
    return tuple(events)


@dataclass(frozen=True)
class SessionState:
    """Where a session stands: an immutable value; :meth:`apply` returns the next one.

    Build one with ``SessionState()`` (nothing run yet), :meth:`from_flow_code`
    or :meth:`from_dict`; the other fields are derived from ``events``.

    Attributes
    ----------
    events
        The path so far (:class:`Event` tuples).
    finished, justification
        Whether the prompt ended, and the orchestrator's justification.
    schedule, process
        The current position (None before the first schedule).
    ended
        Schedules in the order they ended (a schedule ends when the next is entered
        after its P3, or by ``finish``); a schedule that ran twice appears twice.
    processes_run, errors
        Number of processes run (the ``0001`` of snapshot names) and of ``X`` marks.
    """

    events: tuple[Event, ...] = ()
    finished: bool = False
    justification: str | None = None
    schedule: Schedule | None = field(default=None, init=False, compare=False)
    process: Process | None = field(default=None, init=False, compare=False)
    ended: tuple[Schedule, ...] = field(default=(), init=False, compare=False)
    processes_run: int = field(default=0, init=False, compare=False)
    errors: int = field(default=0, init=False, compare=False)

    def __post_init__(self) -> None:
        schedule: Schedule | None = None
        process: Process | None = None
        ended: list[Schedule] = []
        runs = errors = 0
        for event in self.events:
            if event.kind == "S":
                if schedule is not None:
                    ended.append(schedule)
                schedule, process = Schedule(event.value), None
            elif event.kind == "P":
                process = Process(event.value)
                runs += 1
            else:
                errors += 1
        if self.finished and schedule is not None:
            ended.append(schedule)
        for name, value in (("schedule", schedule), ("process", process),
                            ("ended", tuple(ended)), ("processes_run", runs),
                            ("errors", errors)):
            object.__setattr__(self, name, value)

    # -- reading -------------------------------------------------------------------------
    @property
    def flow_code(self) -> str:
        """``S1P123S2P12``."""
        return build_flow_code(self.events)

    @property
    def started(self) -> bool:
        """Whether a schedule has been entered."""
        return self.schedule is not None

    @property
    def position(self) -> str:
        """``"start"`` (nothing run), ``"S2P1"`` or ``"done"`` (the prompt finished)."""
        if self.finished:
            return "done"
        if self.schedule is None or self.process is None:
            return "start"
        return f"S{int(self.schedule)}P{int(self.process)}"

    @property
    def info(self) -> ProcessInfo | None:
        """The :class:`ProcessInfo` of the current position (None at start)."""
        if self.schedule is None or self.process is None:
            return None
        return PROCESSES[(self.schedule, self.process)]

    def describe(self) -> str:
        """``"S1P2 (Knowledge: Crawl)"``, ``"start"`` or ``"done"``."""
        info = self.info
        if info is None or self.finished:
            return self.position
        return f"{self.position} ({info.schedule.title}: {info.name})"

    # -- rules ---------------------------------------------------------------------------
    def _refusal(self, move: Move) -> str | None:
        """Why ``move`` is illegal here, or None when it is legal."""
        if self.finished:
            return "the session has finished"
        if self.schedule is None or self.process is None:
            if move.kind is MoveKind.SCHEDULE:
                return None
            return "no schedule has started; a session starts by entering a schedule (S1-S5)"
        if move.kind is MoveKind.PROCESS:
            allowed = _NEXT_PROCESS[self.process]
            if move.target in allowed:
                return None
            return (f"P{int(self.process)} may go to "
                    f"{' or '.join(f'P{int(p)}' for p in allowed)} only "
                    "(strict P1<->P2<->P3 adjacency)")
        if self.process is not Process.P3:
            what = "a schedule" if move.kind is MoveKind.SCHEDULE else "the prompt"
            return f"{what} ends only after P3 (now at P{int(self.process)})"
        if move.kind is MoveKind.SCHEDULE:
            return None
        if self.schedule is not Schedule.PRODUCTION:
            return "the prompt ends only from Production P3 (Production ends last)"
        missing = [s.title for s in Schedule
                   if s is not Schedule.PRODUCTION and s not in self.ended]
        if missing:
            return f"every schedule must run before the prompt ends; not yet: {', '.join(missing)}"
        if not move.justification.strip():
            return "finishing needs the orchestrator's justification that the goal is met"
        return None

    def legal_moves(self) -> tuple[Move, ...]:
        """Every legal move, in the order P1-P3, S1-S5, finish.

        A ``finish`` listed here stands for any finish with a non-blank justification.
        """
        if self.finished:
            return ()
        candidates = ([Move.to_process(p) for p in Process] + [Move.enter(s) for s in Schedule]
                      + [Move.finish("-")])
        return tuple(Move.finish() if m.kind is MoveKind.FINISH else m
                     for m in candidates if self._refusal(m) is None)

    def is_legal(self, move: Move) -> bool:
        """Whether :meth:`apply` accepts ``move``."""
        return self._refusal(move) is None

    def check(self, move: Move) -> None:
        """Raise :class:`~obdask.exceptions.InvalidTransition` unless ``move`` is legal."""
        why = self._refusal(move)
        if why is None:
            return
        legal = self.legal_moves()
        listed = ", ".join(str(m) for m in legal) or "none"
        raise InvalidTransition(
            f"invalid move {move} at {self.describe()} (flow code {self.flow_code or '-'}): "
            f"{why}; legal moves: {listed}",
            state=self.position, move=str(move), legal=legal)

    def apply(self, move: Move) -> SessionState:
        """The state after ``move``.

        Raises
        ------
        InvalidTransition
            Naming the state, the move and the legal moves; ``self`` is unchanged.
        """
        self.check(move)
        if move.kind is MoveKind.PROCESS:
            return SessionState(self.events + (Event("P", int(move.target)),))
        if move.kind is MoveKind.SCHEDULE:
            return SessionState(self.events + (Event("S", int(move.target)), Event("P", 1)))
        return SessionState(self.events, finished=True, justification=move.justification)

    def error(self) -> SessionState:
        """The state with an ``X`` (an error) recorded at the current position."""
        if self.finished:
            raise InvalidTransition(
                f"cannot record an error at {self.describe()}: the session has finished",
                state=self.position, move="X", legal=())
        return SessionState(self.events + (Event("X"),))

    def default_move(self) -> Move | None:
        """The move taken when the orchestrator gives no valid choice (None when finished).

        P1 -> P2 -> P3; from P3 the first of Knowledge .. Scale not yet ended
        (this schedule counting as ended), else Production; from Production P3
        with every schedule run: ``finish`` with :data:`DEFAULT_JUSTIFICATION`.
        Followed from any state it reaches ``finish`` within 15 processes.
        """
        if self.finished:
            return None
        if self.schedule is None or self.process is None:
            return Move.enter(Schedule.KNOWLEDGE)
        if self.process is not Process.P3:
            return Move.to_process(int(self.process) + 1)
        done = set(self.ended) | {self.schedule}
        missing = [s for s in Schedule if s is not Schedule.PRODUCTION and s not in done]
        if missing:
            return Move.enter(missing[0])
        if self.schedule is Schedule.PRODUCTION:
            return Move.finish(DEFAULT_JUSTIFICATION)
        return Move.enter(Schedule.PRODUCTION)

    def reply_schema(self) -> dict[str, Any]:
        """JSON schema of the orchestrator's structured reply, listing the legal moves here."""
        return {
            "type": "object",
            "properties": {
                "move": {"type": "string", "enum": [str(m) for m in self.legal_moves()]},
                "justification": {"type": "string"},
            },
            "required": ["move", "justification"],
        }

    # -- conversion ----------------------------------------------------------------------
    @classmethod
    def from_flow_code(cls, code: str) -> SessionState:
        """Replay a flow code, checking every step against the rules.

        The result is never finished (a flow code does not record that); apply
        ``Move.finish(...)`` for a finished session.

        Raises
        ------
        FlowCodeError
            Malformed, or a step the rules forbid (the ``InvalidTransition`` is chained).
        """
        events = parse_flow_code(code)
        state = cls()
        i = 0
        while i < len(events):
            event = events[i]
            try:
                if event.kind == "S":
                    state = state.apply(Move.enter(event.value))
                    i += 2  # the schedule's P1 comes with it
                    continue
                if event.kind == "P":
                    state = state.apply(Move.to_process(event.value))
                else:
                    state = state.error()
            except InvalidTransition as exc:
                raise FlowCodeError(
                    f"flow code {code!r}: step {i + 1} ({build_flow_code([event])}) "
                    f"is illegal: {exc}") from exc
            i += 1
        return state

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"flow_code", "position", "finished", "justification"}``."""
        return {"flow_code": self.flow_code, "position": self.position,
                "finished": self.finished, "justification": self.justification}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionState:
        """Inverse of :meth:`to_dict` (the rules are checked on the way)."""
        state = cls.from_flow_code(str(data.get("flow_code") or ""))
        if data.get("finished"):
            justification = str(data.get("justification") or "")
            try:
                state = state.apply(Move.finish(justification))
            except InvalidTransition as exc:
                raise FlowCodeError(f"recorded finish of {state.flow_code!r}: {exc}") from exc
        return state
