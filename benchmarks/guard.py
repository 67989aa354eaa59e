"""The CI guard: bounds on the suite's ratios, and the check against them.

Every bound is on a *ratio of medians measured side by side in one run* (obdask vs
raw Dask on the same cluster, a size vs another size, with vs without the metrics
extension), never on absolute seconds: the 2-core CI machine is shared and its
absolute speed moves by 2x.  Each bound has two figures:

* ``target``: the goal the project works towards (docs/performance.md);
* ``limit``: where ``python -m benchmarks --guard`` fails.  Far past the target
  on purpose, so that noise never fails CI and only a real regression does.

A ratio the run did not measure (a section left out with ``--only``) is skipped,
not failed.  Pure Python: ``tests/test_bench_guard.py`` checks the logic.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """One guarded ratio.

    Parameters
    ----------
    name : str
        The key of the ratio in the results' ``"ratios"`` mapping.
    op : str
        ``"<="`` (the ratio must stay at most ``limit``) or ``">="``.
    target : float
        The goal (reported, never enforced).
    limit : float
        The guard: beyond it ``--guard`` fails.
    why : str
        What the ratio compares, for the report.
    """

    name: str
    op: str
    target: float
    limit: float
    why: str

    def ok(self, value: float) -> bool:
        """Whether ``value`` is within the guard limit."""
        compare = operator.le if self.op == "<=" else operator.ge
        return bool(compare(value, self.limit))

    def meets_target(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        compare = operator.le if self.op == "<=" else operator.ge
        return bool(compare(value, self.target))


BOUNDS: tuple[Bound, ...] = (
    Bound("obdask/raw cmd-true independent", "<=", 1.0, 2.0,
          "obdask vs client.submit of the same shell call, independent jobs"),
    Bound("obdask/raw cmd-true chain50", "<=", 1.0, 2.0,
          "obdask vs client.submit, chains of 50"),
    Bound("obdask/raw cmd-true fanout", "<=", 1.0, 2.0,
          "obdask vs client.submit, fan-out 1 -> 200 -> 1"),
    Bound("obdask/raw noop independent", "<=", 1.0, 1.5,
          "metadata jobs (never scheduled) vs no-op tasks"),
    Bound("obdask/floor marginal cmd-true independent", "<=", 2.0, 40.0,
          "marginal cost per @cmd:true job (slope between two plan sizes) vs the spawn "
          "floor's (`true` spawned from 2 processes)"),
    Bound("obdask/floor marginal cmd-true chain50", "<=", 2.0, 60.0,
          "marginal cost per @cmd:true job in chains of 50 vs the spawn floor's"),
    Bound("obdask/floor marginal cmd-true fanout", "<=", 2.0, 60.0,
          "marginal cost per @cmd:true job in fan-outs 1 -> 200 -> 1 vs the spawn floor's"),
    Bound("obdask/floor cmd-true independent", "<=", 2.0, 40.0,
          "wall per @cmd:true job, fixed costs of a run included, vs the spawn floor"),
    Bound("obdask/floor cmd-true chain50", "<=", 2.0, 60.0,
          "wall per @cmd:true job in chains of 50, fixed costs included, vs the spawn floor"),
    Bound("obdask/floor cmd-true fanout", "<=", 2.0, 60.0,
          "wall per @cmd:true job in fan-outs, fixed costs included, vs the spawn floor"),
    Bound("compile us/step largest/smallest", "<=", 1.5, 4.0,
          "compile time per step, largest plan vs smallest (linear)"),
    Bound("compile bytes/step largest/smallest", "<=", 1.5, 4.0,
          "peak compile memory per step, largest plan vs smallest (bounded)"),
    Bound("client ms/job largest/smallest", "<=", 1.5, 4.0,
          "client CPU per job of a run, largest plan vs smallest (linear)"),
    # Against a computed limit, not a side-by-side run: the one guarded figure a starved
    # machine moves a lot (0.34 at load average 17 on 2 cores; 0.93-0.97 unloaded).
    Bound("llm calls/s / limit", ">=", 0.9, 0.25,
          "model calls/s vs K*P/L with the test server"),
    Bound("session wall/critical path", "<=", 1.1, 2.0,
          "one scripted session vs its model calls back to back"),
    Bound("metrics on/off scheduler CPU", "<=", 1.05, 2.0,
          "scheduler CPU per job with the metrics extension vs without"),
    Bound("metrics on/off scheduler CPU sessions", "<=", 1.05, 2.0,
          "scheduler CPU per session, 20 at once, with the metrics extension vs without"),
)


def check(ratios: dict[str, float], bounds: tuple[Bound, ...] = BOUNDS) -> list[dict[str, Any]]:
    """Compare measured ``ratios`` with ``bounds``.

    Parameters
    ----------
    ratios : dict of str to float
        Measured ratios by name (``results["ratios"]``); missing ones are skipped.
    bounds : tuple of Bound
        The bounds to check (default :data:`BOUNDS`).

    Returns
    -------
    list of dict
        One row per measured bound: ``name``, ``value``, ``op``, ``target``,
        ``limit``, ``meets_target``, ``ok`` (within the guard limit).
    """
    rows = []
    for bound in bounds:
        value = ratios.get(bound.name)
        if value is None or value != value:  # not measured, or NaN from an empty side
            continue
        rows.append({"name": bound.name, "value": float(value), "op": bound.op,
                     "target": bound.target, "limit": bound.limit,
                     "meets_target": bound.meets_target(value), "ok": bound.ok(value)})
    return rows


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row of :func:`check` past its guard limit."""
    return [f"{r['name']} = {r['value']:.2f}, guard {r['op']} {r['limit']:g} "
            f"(target {r['op']} {r['target']:g})" for r in rows if not r["ok"]]
