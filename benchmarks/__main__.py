"""``python -m benchmarks``: the obdask benchmark suite (docs/performance.md).

    python -m benchmarks --quick --out bench-out          # ~2 minutes, every guarded ratio
    python -m benchmarks --quick --guard                  # CI: exit 1 on a ratio far past its bound
    python -m benchmarks --out bench-out                  # full mode (larger plans, more shapes)
    python -m benchmarks --only per-job,compile --repeat 5
    python -m benchmarks --only workers,fleet --out bench-out   # scaling curves (PNG)

Writes ``results.json`` and ``results.md`` (and PNG curves when matplotlib is installed)
to ``--out``.  Sections: per-job, compile, client, llm, sessions, metrics (the default
set) and workers, fleet (the scaling simulation, run when named or with ``--scaling``).
``--guard`` checks the ratios against :data:`benchmarks.guard.BOUNDS` and exits 1 when
one is past its guard limit (never on absolute times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

DEFAULT = ("per-job", "compile", "client", "llm", "sessions", "metrics")
SCALING = ("workers", "fleet")
#: Sections the quick mode leaves out unless named: the client-side scale needs
#: large plans to mean anything (1k-50k jobs, full mode only).
NOT_QUICK = ("client",)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="The obdask benchmark suite.")
    parser.add_argument("--out", default=None, help="folder for results.json, results.md, PNGs")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated sections of {', '.join(DEFAULT + SCALING)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer shapes")
    parser.add_argument("--scaling", action="store_true", help="also run workers and fleet")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per measurement (default 3 quick, 5 full)")
    parser.add_argument("--guard", action="store_true",
                        help="exit 1 when a ratio is past its guard limit")
    args = parser.parse_args(argv)
    if args.only:
        args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(args.sections) - set(DEFAULT + SCALING))
        if unknown:
            parser.error(f"--only: unknown section(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(DEFAULT + SCALING)}")
    else:
        args.sections = [s for s in DEFAULT if not (args.quick and s in NOT_QUICK)]
        args.sections += list(SCALING) if args.scaling else []
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _section(name: str, args: argparse.Namespace, shared: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import scaling, suite

    quick, repeat = args.quick, args.repeat
    if name == "per-job":
        return suite.per_job(shared["client"](), quick, repeat)
    if name == "compile":
        sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000)
        return suite.compile_scale(sizes, repeat)
    if name == "client":
        sizes = (1_000, 10_000) if quick else (1_000, 10_000, 50_000)
        return suite.client_scale(shared["client"](), sizes)
    if name == "llm":
        return suite.llm(quick, repeat)
    if name == "sessions":
        return suite.sessions(quick)
    if name == "metrics":
        return suite.metrics_overhead(quick, repeat)
    if name == "workers":
        return scaling.workers(quick, max(1, repeat // 2))
    return scaling.fleet(quick)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    # Worker processes import benchmarks.* by name: make the repository importable there.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)
    import contextlib

    import distributed

    from benchmarks import guard, report
    from benchmarks.common import local_cluster

    started = time.perf_counter()
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results: dict[str, Any] = {"sections": {}, "ratios": {}, "notes": []}
    failed = False
    with contextlib.ExitStack() as stack:
        cache: dict[str, Any] = {}

        def client() -> Any:  # one cluster for the sections that share it
            if "client" not in cache:
                cache["client"] = stack.enter_context(local_cluster(2, 1))
            return cache["client"]

        for name in args.sections:
            print(f"[{name}]", flush=True)
            try:
                section = _section(name, args, {"client": client})
            except Exception as exc:  # one failed section must not lose the others
                traceback.print_exc()
                section = {"error": f"{type(exc).__name__}: {exc}", "rows": [], "ratios": {}}
                failed = True
            results["sections"][name] = section
            results["ratios"].update(section.get("ratios", {}))
    results["meta"] = {
        "mode": "quick" if args.quick else "full",
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "distributed": distributed.__version__, "repeat": args.repeat,
        "load_before": load_before,
        "load_after": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "seconds": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = guard.check(results["ratios"])
    results["guard"] = rows
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        written, note = report.plots(results, args.out)
        if note:
            results["notes"].append(note)
            print(note)
        results["plots"] = written
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(report.markdown(results, rows))
        print(f"wrote {args.out}/results.json, results.md" +
              "".join(f", {os.path.basename(p)}" for p in written))
    print("\nratio" + " " * 40 + "value   target  guard")
    for r in rows:
        mark = "ok" if r["ok"] else "FAIL"
        print(f"{r['name']:<44} {r['value']:6.2f}  {r['op']}{r['target']:<6g} "
              f"{r['op']}{r['limit']:<6g} {mark}")
    print(f"done in {results['meta']['seconds']:.0f} s (load average before {load_before})")
    if args.guard:
        bad = guard.failures(rows)
        for line in bad:
            print(f"benchmark guard: {line}", file=sys.stderr)
        if failed:
            print("benchmark guard: a section failed to run (see above)", file=sys.stderr)
        return 1 if bad or failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
