"""The benchmark guard's bound checking (`python -m benchmarks --guard`): logic, no timing."""

from __future__ import annotations

import pytest

from benchmarks.__main__ import _args
from benchmarks.guard import BOUNDS, Bound, check, failures

UPPER = Bound("a/b", "<=", 1.0, 2.0, "a vs b")
LOWER = Bound("calls/limit", ">=", 0.9, 0.5, "calls vs limit")


def test_upper_bound_passes_up_to_its_limit_and_fails_past_it():
    rows = check({"a/b": 1.5}, (UPPER,))
    assert rows == [{"name": "a/b", "value": 1.5, "op": "<=", "target": 1.0, "limit": 2.0,
                     "meets_target": False, "ok": True}]
    assert check({"a/b": 2.0}, (UPPER,))[0]["ok"]
    past = check({"a/b": 2.01}, (UPPER,))
    assert not past[0]["ok"]
    assert failures(past) == ["a/b = 2.01, guard <= 2 (target <= 1)"]


def test_lower_bound_fails_below_its_limit_only():
    assert check({"calls/limit": 0.95}, (LOWER,))[0]["meets_target"]
    assert check({"calls/limit": 0.6}, (LOWER,))[0]["ok"]
    assert not check({"calls/limit": 0.49}, (LOWER,))[0]["ok"]


def test_unmeasured_and_nan_ratios_are_skipped_not_failed():
    assert check({}, (UPPER, LOWER)) == []
    assert check({"a/b": float("nan")}, (UPPER,)) == []
    assert failures(check({"other": 99.0}, (UPPER,))) == []


def test_every_guard_limit_is_looser_than_its_target():
    # A guard at or inside its target would fail CI on noise alone.
    for bound in BOUNDS:
        assert bound.meets_target(bound.target)
        assert bound.ok(bound.target), bound.name
        assert bound.limit != bound.target, bound.name
    assert len({b.name for b in BOUNDS}) == len(BOUNDS)


def test_command_line_selects_sections():
    assert _args(["--quick"]).sections == ["per-job", "compile", "llm", "sessions", "metrics"]
    assert _args(["--only", "compile,fleet"]).sections == ["compile", "fleet"]
    assert "workers" in _args(["--scaling"]).sections
    assert _args(["--quick"]).repeat == 3
    with pytest.raises(SystemExit):
        _args(["--only", "nope"])
