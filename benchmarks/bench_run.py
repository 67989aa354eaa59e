"""obdask vs raw Dask, side by side on one LocalCluster (2 processes x 1 thread).

Run:  python benchmarks/bench_run.py [--repeat 5] [--json out.json]

Measures, in one process and on one cluster:
* 2000 metadata jobs (``@doc:``) vs 2000 no-op ``client.submit`` tasks;
* 500 ``@cmd:true`` jobs vs ``client.submit`` of the same shell call, in three
  shapes: independent, chains of 50, fan-out 1 -> 200 -> 1 (repeated to 500);
* compile time of 1k / 10k / 100k-step plans (parse + validate + compile).

Reports medians of the repeats and the obdask/raw ratios.  Targets (see
docs/performance.md): ``@cmd:true`` ratio <= 1.2, metadata plans far faster
than raw Dask, compile time linear in plan size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

import dask

import obdask
from obdask.compile import compile_plan
from obdask.plan import Plan


def noop(*args):
    return None


def sh_true(*args):
    # What an @cmd:true job does at its core: a shell running `true`.
    return subprocess.run(["/bin/sh", "-c", "true"], stdin=subprocess.DEVNULL,
                          capture_output=True).returncode


def shape_edges(shape: str, n: int) -> list[list[int]]:
    """deps[i] = indices job i depends on."""
    if shape == "independent":
        return [[] for _ in range(n)]
    if shape == "chain50":
        return [[] if i % 50 == 0 else [i - 1] for i in range(n)]
    if shape == "fanout":  # 1 -> 200 -> 1, repeated; narrower where n is under 202
        width = min(200, max(1, n - 2))
        deps: list[list[int]] = []
        while len(deps) < n:
            base = len(deps)
            deps.append([])
            deps.extend([[base]] * width)
            deps.append(list(range(base + 1, base + width + 1)))
        return deps[:n]
    raise ValueError(shape)


def plan_text(payload: str, deps: list[list[int]]) -> str:
    lines = []
    for i, ds in enumerate(deps):
        dep = f" deps={','.join(f'j{d}' for d in ds)}" if ds else ""
        lines.append(f"- [ ] id=j{i} lane=1{dep} payload={payload}")
    return "\n".join(lines) + "\n"


def run_raw(client, func, deps: list[list[int]]) -> float:
    start = time.perf_counter()
    futures = []
    for i, ds in enumerate(deps):
        futures.append(client.submit(func, *[futures[d] for d in ds], key=f"raw-{i}-{start}",
                                     pure=False))
    client.gather(futures)
    return time.perf_counter() - start


def run_obdask(client, folder: str, name: str, text: str) -> float:
    path = os.path.join(folder, f"{name}.md")
    with open(path, "w") as f:
        f.write(text)
    start = time.perf_counter()
    result = obdask.run(Plan.from_file(path), client)
    elapsed = time.perf_counter() - start
    assert result.ok, result.frame.status.value_counts()
    return elapsed


def compare(client, folder, name, payload, func, deps, repeat):
    text = plan_text(payload, deps)
    raw, ours = [], []
    for _ in range(repeat):  # interleaved, so drift hits both sides alike
        raw.append(run_raw(client, func, deps))
        ours.append(run_obdask(client, folder, name, text))
    row = {"case": name, "jobs": len(deps), "raw_s": statistics.median(raw),
           "obdask_s": statistics.median(ours)}
    row["ratio"] = row["obdask_s"] / row["raw_s"]
    print(f"{row['case']:<24}{row['jobs']:>6}{row['raw_s']:>9.3f}{row['obdask_s']:>10.3f}"
          f"{row['ratio']:>8.2f}", flush=True)
    return row


def compile_times(sizes=(1_000, 10_000, 100_000)) -> list[dict]:
    rows = []
    for n in sizes:
        text = plan_text("@cmd:true", shape_edges("chain50", n))
        start = time.perf_counter()
        compiled = compile_plan(Plan.from_text(text, path="bench.md"))
        elapsed = time.perf_counter() - start
        rows.append({"steps": n, "compile_s": elapsed, "us_per_step": elapsed / n * 1e6,
                     "jobs": len(compiled.jobs)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cmd-jobs", type=int, default=500)
    parser.add_argument("--noop-jobs", type=int, default=2000)
    parser.add_argument("--compile-sizes", default="1000,10000,100000",
                        help="plan sizes for the compile-time table, comma-separated")
    parser.add_argument("--json", default=None, help="write results to this file")
    args = parser.parse_args(argv)
    from distributed import Client, LocalCluster

    rows = []
    print(f"{'case':<24}{'jobs':>6}{'raw s':>9}{'obdask s':>10}{'ratio':>8}", flush=True)
    with tempfile.TemporaryDirectory() as folder, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        rows.append(compare(client, folder, "noop-metadata", "@doc:noop", noop,
                            shape_edges("independent", args.noop_jobs), args.repeat))
        for shape in ("independent", "chain50", "fanout"):
            rows.append(compare(client, folder, f"cmd-true-{shape}", "@cmd:true", sh_true,
                                shape_edges(shape, args.cmd_jobs), args.repeat))
        # The same without kill-on-worker-death (no setpriv exec per command).
        with dask.config.set({"obdask.cmd.pdeathsig": False}):
            rows.append(compare(client, folder, "cmd-true-indep-nopdeath", "@cmd:true",
                                sh_true, shape_edges("independent", args.cmd_jobs),
                                args.repeat))
    compiles = compile_times(tuple(int(n) for n in args.compile_sizes.split(",")))
    print(f"\n{'steps':>8}{'compile s':>11}{'us/step':>9}")
    for c in compiles:
        print(f"{c['steps']:>8}{c['compile_s']:>11.3f}{c['us_per_step']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": rows, "compile": compiles, "repeat": args.repeat,
                       "python": sys.version.split()[0]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
