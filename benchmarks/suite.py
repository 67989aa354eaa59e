"""The suite's sections on one machine: each returns ``{"rows": [...], "ratios": {...}}``.

* ``per-job``: obdask vs raw Dask per job and vs the process-spawn floor, on one
  cluster, interleaved (:func:`per_job`);
* ``compile``: compile time and peak memory vs plan size (:func:`compile_scale`);
* ``client``: client CPU and memory of a run vs plan size (:func:`client_scale`);
* ``llm``: model calls/s vs K*P/L with the test server (:func:`llm`);
* ``sessions``: one session's wall time vs its critical path (:func:`sessions`);
* ``metrics``: scheduler CPU per job and per session with and without the metrics
  extension (:func:`metrics_overhead`).

Medians of ``repeat`` runs with min-max; ratios are of medians measured side by side.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
import tracemalloc
from typing import Any

import dask
import psutil

from benchmarks.bench_run import noop, run_raw, sh_true
from benchmarks.common import (
    NO_SANDBOX,
    OPTIMIZE_OFF,
    OPTIMIZE_ON,
    RssPeak,
    SpawnFloor,
    interleave,
    plan_text,
    ratio,
    shape_edges,
    stat,
    write_plan,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _set_config(settings: dict[str, Any]) -> None:
    # Global on purpose: the workers read obdask.cmd.* from their own config.
    dask.config.set(settings)


def configure(client: Any, settings: dict[str, Any]) -> None:
    """Set ``settings`` in this process and on every worker of ``client``."""
    _set_config(settings)
    client.run(_set_config, settings)


def run_obdask(client: Any, path: str, settings: dict[str, Any]) -> float:
    """Seconds of one ``obdask.run`` of ``path`` with ``settings`` everywhere."""
    configure(client, settings)
    start = time.perf_counter()
    run_ok(client, path)
    return time.perf_counter() - start


def run_ok(client: Any, plan: Any) -> Any:
    """``obdask.run(plan, client)``'s result; a failed run raises (a benchmark's error)."""
    import obdask

    # as_current: obdask.run waits through distributed.wait, which takes the default
    # client; with two clusters up (metrics section) that must be this one.
    with client.as_current():
        result = obdask.run(plan, client)
    if not result.ok:
        raise RuntimeError(f"{plan}: the run failed: {result.summary['counts']}")
    return result


def per_job(client: Any, quick: bool, repeat: int) -> dict[str, Any]:
    """obdask (optimisations on, off) vs raw Dask vs the spawn floor, per shape."""
    n_cmd, n_noop = (200, 500) if quick else (2000, 2000)
    shapes = ("independent", "chain50", "fanout")
    cases = [("noop", "@doc:noop", noop, "independent", n_noop)]
    cases += [("cmd-true", "@cmd:true", sh_true, shape, n_cmd) for shape in shapes]
    rows, ratios = [], {}
    floor = SpawnFloor()
    try:
        with tempfile.TemporaryDirectory(prefix="obdask-bench-") as folder:
            # Warm-up, untimed: imports and first-task costs on the workers, the pool.
            warm = write_plan(folder, "warm-up", plan_text("@cmd:true", shape_edges("chain50", 20)))
            run_raw(client, sh_true, shape_edges("chain50", 20))
            run_obdask(client, warm, {**NO_SANDBOX, **OPTIMIZE_ON})
            floor(20)
            for kind, payload, func, shape, n in cases:
                deps = shape_edges(shape, n)
                path = write_plan(folder, f"{kind}-{shape}", plan_text(payload, deps))
                runs = {
                    "raw": lambda f=func, d=deps: run_raw(client, f, d),
                    "obdask": lambda p=path: run_obdask(client, p, {**NO_SANDBOX, **OPTIMIZE_ON}),
                }
                if not quick:  # the optimisations' own column (full mode)
                    runs["obdask-unopt"] = lambda p=path: run_obdask(
                        client, p, {**NO_SANDBOX, **OPTIMIZE_OFF})
                if kind == "cmd-true":
                    runs["floor"] = lambda n=n: floor(n)
                    # the same shape a tenth the size: the slope between the two sizes is
                    # the marginal cost per job, without the per-run fixed costs
                    small = max(50, n // 10 // 50 * 50)
                    small_deps = shape_edges(shape, small)
                    small_path = write_plan(folder, f"{kind}-{shape}-small",
                                            plan_text(payload, small_deps))
                    runs["obdask-small"] = lambda p=small_path: run_obdask(
                        client, p, {**NO_SANDBOX, **OPTIMIZE_ON})
                    runs["raw-small"] = lambda f=func, d=small_deps: run_raw(client, f, d)
                    runs["floor-small"] = lambda small=small: floor(small)
                if kind == "cmd-true" and shape == "independent" and not quick:
                    runs["obdask-sandbox"] = lambda p=path: run_obdask(
                        client, p, {"obdask.cmd.sandbox.mode": "auto", **OPTIMIZE_ON})
                times = interleave(runs, repeat)
                row = {"case": f"{kind} {shape}", "jobs": n, **times}
                name = f"{kind} {shape}"
                ratios[f"obdask/raw {name}"] = ratio(times["obdask"], times["raw"])
                if "obdask-unopt" in times:
                    ratios[f"unoptimized/raw {name}"] = ratio(times["obdask-unopt"], times["raw"])
                if "floor" in times:
                    ratios[f"obdask/floor {name}"] = ratio(times["obdask"], times["floor"])
                    ratios[f"raw/floor {name}"] = ratio(times["raw"], times["floor"])
                    slopes = {side: marginal(times[side], times[f"{side}-small"], n, small)
                              for side in ("obdask", "raw", "floor")}
                    row["marginal_ms_per_job"] = {k: 1e3 * v for k, v in slopes.items()}
                    ratios[f"obdask/floor marginal {name}"] = ratio(slopes["obdask"],
                                                                    slopes["floor"])
                    ratios[f"raw/floor marginal {name}"] = ratio(slopes["raw"], slopes["floor"])
                if "obdask-sandbox" in times:
                    ratios[f"sandbox/no-sandbox {name}"] = ratio(times["obdask-sandbox"],
                                                                 times["obdask"])
                rows.append(row)
                _print_row(row)
    finally:
        floor.close()
        configure(client, {**NO_SANDBOX, **OPTIMIZE_ON})
    return {"rows": rows, "ratios": ratios}


def marginal(big: dict[str, Any], small: dict[str, Any], n_big: int, n_small: int) -> float:
    """Seconds per job between two plan sizes: ``(T(n_big) - T(n_small)) / (n_big - n_small)``
    of the medians (the fixed cost of a run cancels out)."""
    return (big["median"] - small["median"]) / (n_big - n_small)


def _print_row(row: dict[str, Any]) -> None:
    cols = [k for k in row if isinstance(row[k], dict) and "median" in row[k]
            and not k.endswith("-small")]
    parts = "  ".join(f"{k} {1000 * row[k]['median'] / row['jobs']:.2f}" for k in cols)
    if "marginal_ms_per_job" in row:
        parts += "  | marginal " + "  ".join(
            f"{k} {v:.2f}" for k, v in row["marginal_ms_per_job"].items())
    print(f"  {row['case']:<24} {row['jobs']:>6} jobs  ms/job: {parts}", flush=True)


def compile_scale(sizes: tuple[int, ...], repeat: int) -> dict[str, Any]:
    """Parse + validate + compile time, and peak traced memory, per plan size."""
    from obdask.compile import compile_plan
    from obdask.plan import Plan

    rows = []
    for n in sizes:
        text = plan_text("@cmd:true", shape_edges("chain50", n))
        times = []
        for _ in range(repeat):
            gc.collect()
            start = time.perf_counter()
            compile_plan(Plan.from_text(text, path="bench.md"))
            times.append(time.perf_counter() - start)
        # Memory in a separate pass: tracemalloc slows Python down 2-3x.
        gc.collect()
        tracemalloc.start()
        compiled = compile_plan(Plan.from_text(text, path="bench.md"))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        row = {"steps": n, "jobs": len(compiled.jobs), "seconds": stat(times),
               "us_per_step": 1e6 * stat(times)["median"] / n, "peak_bytes": peak,
               "bytes_per_step": peak / n}
        del compiled
        rows.append(row)
        print(f"  compile {n:>7} steps  {row['us_per_step']:.1f} us/step  "
              f"{row['bytes_per_step'] / 1024:.1f} KiB/step peak", flush=True)
    return {"rows": rows, "ratios": {
        "compile us/step largest/smallest": rows[-1]["us_per_step"] / rows[0]["us_per_step"],
        "compile bytes/step largest/smallest":
            rows[-1]["bytes_per_step"] / rows[0]["bytes_per_step"]}}


def client_scale(client: Any, sizes: tuple[int, ...]) -> dict[str, Any]:
    """Client CPU and RSS growth of one run per plan size (independent ``@cmd:true``).

    The scheduler of a ``LocalCluster`` lives in this process, so the CPU and memory
    here are client plus scheduler; both grow with the plan the same way.
    """
    rows = []
    proc = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="obdask-bench-") as folder:
        for n in sizes:
            path = write_plan(folder, f"client-{n}", plan_text("@cmd:true",
                                                               shape_edges("independent", n)))
            gc.collect()
            configure(client, {**NO_SANDBOX, **OPTIMIZE_ON})
            cpu0 = sum(proc.cpu_times()[:2])
            with RssPeak() as rss:
                wall = run_obdask(client, path, {**NO_SANDBOX, **OPTIMIZE_ON})
            cpu = sum(proc.cpu_times()[:2]) - cpu0
            row = {"jobs": n, "wall_s": wall, "cpu_s": cpu, "ms_per_job": 1000 * cpu / n,
                   "rss_grown_bytes": rss.grown, "bytes_per_job": rss.grown / n}
            rows.append(row)
            print(f"  client {n:>6} jobs  wall {wall:.1f}s  cpu {row['ms_per_job']:.2f} ms/job  "
                  f"rss +{rss.grown / 2**20:.0f} MiB", flush=True)
    return {"rows": rows, "ratios": {
        "client ms/job largest/smallest": rows[-1]["ms_per_job"] / rows[0]["ms_per_job"]}}


def llm(quick: bool, repeat: int) -> dict[str, Any]:
    """Model calls/s over K test servers (P slots, latency L) vs the limit K*P/L."""
    from benchmarks.bench_llm import MODEL, measure
    from benchmarks.common import local_cluster
    from obdask.testing import OllamaTestServer

    # Quick: a longer latency, so a loaded CI machine's scheduling delays weigh less.
    slots, latency = (2, 0.5) if quick else (2, 0.2)
    ks, calls = ((2,), 40) if quick else ((1, 2, 4), 200)
    servers = [OllamaTestServer(models=[MODEL], num_parallel=slots, first_token_latency=latency,
                                reply_tokens=(2, 2)).start() for _ in range(max(ks))]
    rows = []
    try:
        with dask.config.set({"obdask.llm.slots": slots, "obdask.llm.backoff": "0.05s"}), \
                local_cluster(2, 8) as client:
            measure(client, [servers[0].url], 8)  # warm-up: imports, semaphores
            for k in ks:
                urls = [s.url for s in servers[:k]]
                seconds = stat([measure(client, urls, calls) for _ in range(repeat)])
                rate = calls / seconds["median"]
                limit = k * slots / latency
                rows.append({"K": k, "P": slots, "L": latency, "calls": calls,
                             "seconds": seconds, "calls_per_s": rate, "limit": limit,
                             "ratio": rate / limit})
                print(f"  llm K={k} P={slots} L={latency}: {rate:.1f} calls/s of {limit:.0f} "
                      f"({rate / limit:.2f})", flush=True)
    finally:
        for server in servers:
            server.stop()
    return {"rows": rows, "ratios": {"llm calls/s / limit": rows[-1]["ratio"]}}


def sessions(quick: bool) -> dict[str, Any]:
    """One scripted session's wall time vs its critical path (``bench_sessions``)."""
    from benchmarks import bench_sessions

    argv = ["--latency", "0.3" if quick else "0.5", "--sessions", "0" if quick else "10"]
    out = bench_sessions.main(argv)
    ratios = {"session wall/critical path": out["single"]["ratio"]}
    rows = [{"part": "one session", "latency_s": out["latency_s"], **out["single"]}]
    if "concurrent" in out:
        ratios["sessions calls/s / limit"] = out["concurrent"]["ratio"]
        rows.append({"part": "sessions at once", "latency_s": out["latency_s"],
                     **out["concurrent"]})
    return {"rows": rows, "ratios": ratios}


def metrics_overhead(quick: bool, repeat: int) -> dict[str, Any]:
    """Scheduler CPU with and without the metrics extension, side by side (``bench_metrics``).

    Full mode: the issue's 5000-job plan and 20 sessions at once.  Quick mode (the CI
    guard): 600 jobs, no sessions; the scheduler's CPU is read in nanoseconds, so 600
    jobs (some 0.2 s of scheduler CPU) are far above its resolution.
    """
    from benchmarks import bench_metrics

    jobs, sessions = (600, 0) if quick else (5000, 20)
    return bench_metrics.measure(jobs, sessions, repeat)
