"""The 5x3 session state machine: every state x every move, flow codes, hypothesis walks."""

from __future__ import annotations

import itertools
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obdask.exceptions import FlowCodeError, InvalidTransition
from obdask.session.model import (
    Move,
    Process,
    Schedule,
    SessionState,
    build_flow_code,
    parse_flow_code,
    process_info,
)

# --- An independent statement of the rules (ollamabot-concepts.md section 3) -------------
# Inside a schedule: start at P1; P1 -> P1|P2; P2 -> P1|P2|P3; P3 -> P2|P3|end the schedule.
# A schedule may end only after P3. The prompt may end only when all five schedules have run
# (ended) at least once, Production ended last, and the orchestrator justifies it.
NEXT_PROCESS = {1: {1, 2}, 2: {1, 2, 3}, 3: {2, 3}}
ALL_SCHEDULES = {1, 2, 3, 4, 5}
PRODUCTION = 5


def rule_allows(position, ended, finished, move_text, justification=""):
    """position: None (nothing started) or (schedule, process); ended: schedules ended."""
    if finished:
        return False
    if position is None:
        return move_text.startswith("S")  # a session starts by entering a schedule (at P1)
    schedule, process = position
    if move_text.startswith("P"):
        return int(move_text[1]) in NEXT_PROCESS[process]
    if move_text.startswith("S"):
        return process == 3  # ends this schedule, enters the named one at P1
    assert move_text == "finish"
    return (process == 3 and schedule == PRODUCTION
            and ended | {schedule} == ALL_SCHEDULES and bool(justification.strip()))


MOVES = [f"P{p}" for p in (1, 2, 3)] + [f"S{s}" for s in (1, 2, 3, 4, 5)]


def make_move(text, justification=""):
    if text == "finish":
        return Move.finish(justification)
    return Move.parse(text)


def reach(ended, position, with_errors=False):
    """A state whose ended set is exactly ``ended`` and whose position is ``position``."""
    state = SessionState()
    steps = []
    for s in sorted(ended):
        steps += [f"S{s}", "P2", "P3"]
    if position is not None:
        s, p = position
        steps.append(f"S{s}")
        steps += [f"P{q}" for q in range(2, p + 1)]
    for step in steps:
        state = state.apply(Move.parse(step))
        if with_errors:
            state = state.error()
    return state


def all_states():
    subsets = [set(c) for r in range(6) for c in itertools.combinations(sorted(ALL_SCHEDULES), r)]
    for ended in subsets:
        for s in ALL_SCHEDULES:
            for p in (1, 2, 3):
                for errors in (False, True):
                    yield ended, (s, p), errors
    yield set(), None, False


@pytest.mark.parametrize("ended,position,errors", list(all_states()))
def test_every_state_x_every_move(ended, position, errors):
    state = reach(ended, position, errors)
    if position is not None:
        assert (state.schedule, state.process) == (Schedule(position[0]), Process(position[1]))
    assert set(state.ended) == ended
    legal = {str(m) for m in state.legal_moves()}
    for text in MOVES + ["finish"]:
        for justification in ("the goal is met: tests pass", "", "   "):
            if text != "finish" and justification:
                continue
            move = make_move(text, justification)
            allowed = rule_allows(position, ended, False, text, justification)
            assert state.is_legal(move) is allowed, (state.flow_code, text, justification)
            if text != "finish" or justification.strip():
                assert (text in legal) is allowed, (state.flow_code, text)
            if allowed:
                after = state.apply(move)
                assert after is not state
                assert after.flow_code.startswith(state.flow_code)
            else:
                with pytest.raises(InvalidTransition) as info:
                    state.apply(move)
                message = str(info.value)
                assert str(move) in message and state.position in message
                assert "legal moves" in message
                assert info.value.legal == tuple(state.legal_moves())
                assert isinstance(info.value, ValueError)


def test_finished_state_allows_nothing():
    state = reach({1, 2, 3, 4}, (5, 3)).apply(Move.finish("all five ran; tests pass"))
    assert state.finished and state.position == "done"
    assert state.justification == "all five ran; tests pass"
    assert state.legal_moves() == ()
    assert state.default_move() is None
    for text in MOVES + ["finish"]:
        with pytest.raises(InvalidTransition, match="finished"):
            state.apply(make_move(text, "again"))
    with pytest.raises(InvalidTransition, match="finished"):
        state.error()


def test_full_session_flow_code():
    state = SessionState()
    for _ in range(40):
        move = state.default_move()
        if move is None:
            break
        state = state.apply(move)
    assert state.finished
    assert state.flow_code == "S1P123S2P123S3P123S4P123S5P123"
    assert state.processes_run == 15


def test_spec_flow_code_example():
    state = SessionState.from_flow_code("S1P123S2P12")
    assert (state.schedule, state.process) == (Schedule.PLAN, Process.P2)
    assert state.ended == (Schedule.KNOWLEDGE,)
    assert state.flow_code == "S1P123S2P12"


def test_error_marks_x_and_keeps_position():
    state = SessionState().apply(Move.enter(Schedule.KNOWLEDGE)).error()
    assert state.flow_code == "S1P1X"
    state = state.apply(Move.to_process(2))
    assert state.flow_code == "S1P1XP2"
    assert state.errors == 1
    assert SessionState.from_flow_code("S1P1XP2") == state
    assert SessionState().error().flow_code == "X"
    assert SessionState.from_flow_code("XS1P1").events == SessionState().error().apply(
        Move.enter(1)).events


def test_upstream_style_flow_code_is_accepted():
    # obot writes a P before every process; we read it and write the compact form.
    state = SessionState.from_flow_code("S1P1P2P3S2P1")
    assert state.flow_code == "S1P123S2P1"


@pytest.mark.parametrize("code,fragment", [
    ("S1P13", "P3"),             # P1 -> P3 skips P2
    ("S1P12S2P1", "S2"),         # schedule ended before P3
    ("S6P1", "S6"),              # no sixth schedule
    ("S1P2", "P1"),              # a schedule starts at P1
    ("P1", "no schedule"),       # a process outside any schedule
    ("S1P1Q", "Q"),
    ("S1", "P1"),
    ("S1P", "P"),
    ("S1P10", "0"),
    ("s1p1", "s"),
])
def test_bad_flow_codes(code, fragment):
    with pytest.raises(FlowCodeError) as info:
        SessionState.from_flow_code(code)
    assert code in str(info.value) and fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_move_parsing_and_json():
    assert Move.parse("P2") == Move.to_process(Process.P2)
    assert Move.parse("s3") == Move.enter(Schedule.IMPLEMENT)
    assert Move.parse("finish") == Move.finish("x")  # the justification does not compare
    assert Move.from_dict({"move": "finish", "justification": "done"}).justification == "done"
    assert Move.from_dict(Move.enter(4).to_dict()) == Move.enter(4)
    for bad in ("P4", "S0", "stop", "", "P", None, 3):
        with pytest.raises(ValueError):
            Move.parse(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Move.from_dict({"next": "P2"})


def test_reply_schema_lists_legal_moves():
    state = reach({1}, (2, 2))
    schema = state.reply_schema()
    assert schema["properties"]["move"]["enum"] == ["P1", "P2", "P3"]
    assert "justification" in schema["properties"]
    assert schema["required"] == ["move", "justification"]


def test_default_walk_from_any_state_terminates_after_production():
    for ended, position, errors in all_states():
        state = reach(ended, position, errors)
        for _ in range(60):
            move = state.default_move()
            if move is None:
                break
            assert state.is_legal(move)
            state = state.apply(move)
        assert state.finished, (ended, position)
        assert state.ended[-1] == Schedule.PRODUCTION
        assert set(state.ended) == set(Schedule)


def test_process_table_and_roles():
    assert [s.title for s in Schedule] == ["Knowledge", "Plan", "Implement", "Scale",
                                          "Production"]
    assert process_info(Schedule.KNOWLEDGE, Process.P1).name == "Research"
    assert process_info(2, 2).name == "Clarify" and process_info(2, 2).consultation == "optional"
    assert process_info(3, 3).name == "Feedback" and process_info(3, 3).consultation == "mandatory"
    assert process_info(5, 3).name == "Harmonize"
    assert process_info(1, 2).role == "researcher" and process_info(3, 1).role == "coder"
    assert sum(process_info(s, p).consultation is not None for s in Schedule for p in Process) == 2


def test_state_is_immutable_hashable_and_picklable():
    state = reach({1, 2}, (3, 2), with_errors=True)
    with pytest.raises(AttributeError):
        state.events = ()  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(state)) == state
    assert hash(state) == hash(SessionState.from_flow_code(state.flow_code))
    assert SessionState.from_dict(state.to_dict()) == state
    done = reach({1, 2, 3, 4}, (5, 3)).apply(Move.finish("ok"))
    assert SessionState.from_dict(done.to_dict()) == done
    assert pickle.loads(pickle.dumps(InvalidTransition("m", state="S1P1", move="P3",
                                                       legal=()))).move == "P3"


# --- hypothesis ---------------------------------------------------------------------------
def walk(choices):
    state = SessionState()
    for choice, err in choices:
        legal = state.legal_moves()
        if not legal:
            break
        move = legal[choice % len(legal)]
        if move.kind.value == "finish":
            move = Move.finish("all five schedules ran; goal met")
        state = state.apply(move)
        if err and not state.finished:
            state = state.error()
    return state


choices_st = st.lists(st.tuples(st.integers(0, 20), st.integers(0, 9).map(lambda n: n == 0)),
                      max_size=120)


@settings(max_examples=300, deadline=None)
@given(choices_st)
def test_random_legal_walks_parse_back(choices):
    state = walk(choices)
    code = state.flow_code
    assert build_flow_code(parse_flow_code(code)) == code
    back = SessionState.from_flow_code(code)
    if state.finished:
        back = back.apply(Move.finish(state.justification or ""))
    assert back == state
    digits = [c for i, c in enumerate(code) if c.isdigit() and (i == 0 or code[i - 1] != "S")]
    assert back.processes_run == len(digits)


@settings(max_examples=300, deadline=None)
@given(choices_st, st.sampled_from(MOVES + ["finish"]), st.sampled_from(["", "justified"]))
def test_illegal_moves_always_raise(choices, text, justification):
    state = walk(choices)
    position = None if state.schedule is None else (int(state.schedule), int(state.process))
    allowed = rule_allows(position, {int(s) for s in state.ended}, state.finished, text,
                          justification)
    move = make_move(text, justification)
    before = state.flow_code
    if allowed:
        assert state.apply(move).processes_run >= state.processes_run
    else:
        with pytest.raises(InvalidTransition):
            state.apply(move)
    assert state.flow_code == before  # never mutated


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="SPX0123456", max_size=30))
def test_arbitrary_strings_parse_or_raise_flow_code_error(code):
    try:
        state = SessionState.from_flow_code(code)
    except FlowCodeError:
        return
    assert SessionState.from_flow_code(state.flow_code) == state
