"""Where a run's serial time goes in the client: each phase, per plan size.

``python benchmarks/run_phases.py --jobs 200,2000 --repeat 5`` runs ``@cmd:true`` plans
of each size (independent jobs, or ``--shape chain50`` or ``fanout``) on one LocalCluster
of 2 worker processes x 1 thread with the suite's ``per-job`` settings (sandbox off, fusion and
batching on), after a warm-up run, and prints the median milliseconds of each phase:
``parse`` (:meth:`obdask.Plan.from_file`, timed here), the phases a run records in its
summary (``client_s``: ``prepare``, ``place``, ``optimize``, ``submit``, ``wait``,
``collect``) and ``write`` (the records and summary files, after the summary: the call's
time less the run's ``duration_s``).  Everything but ``wait`` is serial: no job runs
before ``submit`` ends or after ``wait`` does, so at the margin between two sizes
those phases add to every job's wall time in full.  ``--toggle KEY`` measures each
size with the boolean config key ``KEY`` (read in this process, e.g.
``obdask.optimize.batch``) false and true, alternately; ``--json`` writes the figures.
Means are printed beside the medians for ``total``: a full garbage collection hits
one run in a few.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import dask

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    NO_SANDBOX,
    OPTIMIZE_ON,
    local_cluster,
    plan_text,
    shape_edges,
    write_plan,
)
from benchmarks.suite import configure, run_ok  # noqa: E402

SETTINGS = {**NO_SANDBOX, **OPTIMIZE_ON}
#: The phases in which no job runs (``wait`` is the jobs' time).
SERIAL = ("parse", "prepare", "place", "optimize", "submit", "collect", "write")


def one_run(client: Any, path: str) -> dict[str, float]:
    """Seconds of each phase of one run of the plan file ``path``."""
    import obdask

    start = time.perf_counter()
    plan = obdask.Plan.from_file(path)
    parsed = time.perf_counter()
    result = run_ok(client, plan)
    elapsed = time.perf_counter() - parsed
    return {"parse": parsed - start, **result.summary["client_s"],
            "write": elapsed - result.summary["duration_s"], "total": elapsed + parsed - start}


def measure(sizes: list[int], shape: str, repeat: int, toggle: str | None = None
            ) -> dict[str, Any]:
    dask.config.set(SETTINGS)
    out: dict[str, Any] = {"shape": shape, "repeat": repeat, "toggle": toggle, "sizes": {}}
    cases = [(n, value) for n in sizes for value in ((False, True) if toggle else (None,))]
    with local_cluster(2, 1) as client, tempfile.TemporaryDirectory() as folder:
        configure(client, SETTINGS)
        warm = write_plan(folder, "warm", plan_text("@cmd:true", shape_edges(shape, 100)))
        one_run(client, warm)
        paths = {n: write_plan(folder, f"p{n}", plan_text("@cmd:true", shape_edges(shape, n)))
                 for n in sizes}
        runs: dict[tuple[int, bool | None], list[dict[str, float]]] = {c: [] for c in cases}
        for _ in range(repeat):  # sizes and switch alternate: a slow minute hits each alike
            for n, value in cases:
                with dask.config.set({toggle: value} if toggle else {}):
                    runs[n, value].append(one_run(client, paths[n]))

    def label(n: int, value: bool | None) -> str:
        return str(n) if value is None else f"{n} {str(toggle).rsplit('.', 1)[-1]}={value}"

    for (n, value), rows in runs.items():
        row = {phase: statistics.median(r[phase] for r in rows) * 1e3 for phase in rows[0]}
        row["total mean"] = statistics.mean(r["total"] for r in rows) * 1e3
        out["sizes"][label(n, value)] = row
    if len(sizes) > 1:  # per switch position: the serial phases' slope between the sizes
        out["serial_ms_per_job"] = {}
        for value in dict.fromkeys(value for _, value in cases):
            small, big = out["sizes"][label(sizes[0], value)], out["sizes"][label(sizes[-1], value)]
            out["serial_ms_per_job"][label(sizes[0], value)] = sum(
                big[p] - small[p] for p in SERIAL) / (sizes[-1] - sizes[0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="200,2000", help="plan sizes, comma-separated")
    parser.add_argument("--shape", default="independent",
                        choices=["independent", "chain50", "fanout"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--toggle", help="a boolean config key to measure off and on")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.jobs.split(",")]
    res = measure(sizes, args.shape, args.repeat, args.toggle)
    phases = list(next(iter(res["sizes"].values())))
    print(f"{args.shape}, median ms of {args.repeat} runs, load average "
          f"{os.getloadavg()[0]:.1f}")
    width = max(len(label) for label in res["sizes"])
    print(f"  {'jobs':>{width}} " + " ".join(f"{p:>10}" for p in phases))
    for label, row in res["sizes"].items():
        print(f"  {label:>{width}} " + " ".join(f"{row[p]:10.1f}" for p in phases))
    for small, slope in res.get("serial_ms_per_job", {}).items():
        print(f"  serial phases at the margin: {slope:.3f} ms/job (from {small} to "
              f"{sizes[-1]} jobs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
