"""Judge wall time vs its critical path (slowest expert + synthesis); target <= 1.1x.

Run:  python benchmarks/bench_judge.py [--latency 0.5] [--repeat 3]

The simulated fleet of ``obdask demo`` (three test-server endpoints; coder, researcher
and vision experts, orchestrator synthesis) with per-expert first-token latencies of
L, L/2 and L/4 and L/4 for the synthesis, on a LocalCluster of 2 workers x 2 threads.
The quickstart plan is run once; then the judge runs ``--repeat`` times on it (one
warm-up first: a cold worker imports the model client).  Reported per run: wall time
of :func:`obdask.judge.judge`, its critical path as the tasks measured it, and the
ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import dask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from distributed import Client, LocalCluster

    import obdask
    from obdask import demo
    from obdask.judge import judge

    lat = {"qwen2.5-coder:14b": args.latency, "llama3.2:3b": args.latency / 2,
           "llava:13b": args.latency / 4, "qwen2.5-coder:7b": args.latency / 4}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, demo.simulated_fleet(latency=0.0) as fleet, \
            LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=":0",
                         silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        plan = demo.example_plan(tmp)
        settings = {"obdask.llm.endpoints": [s.url for s in fleet.values()],
                    "obdask.store.records": os.path.join(tmp, "records")}
        with dask.config.set(settings):
            result = obdask.run(plan, client)
            judge(client, plan, run_id=result.run_id)  # warm-up
            _set_latencies(fleet, lat)
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                j = judge(client, plan, run_id=result.run_id)
                wall = time.perf_counter() - t0
                rows.append({"wall_s": wall, "critical_path_s": j.critical_path_s,
                             "ratio": wall / j.critical_path_s, "verdict": j.verdict,
                             "experts_s": {e.name: e.duration_s for e in j.experts},
                             "synthesis_s": j.synthesis["duration_s"], "phases": j.phases})
                print(f"judge wall {wall:.3f}s  critical path {j.critical_path_s:.3f}s  "
                      f"ratio {wall / j.critical_path_s:.3f}  phases "
                      + " ".join(f"{k} {v:.3f}" for k, v in j.phases.items())
                      + "  experts " + " ".join(f"{e.duration_s:.3f}" for e in j.experts))
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"median ratio {ratio:.3f} (target <= 1.1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"latency": args.latency, "runs": rows, "median_ratio": ratio}, f,
                      indent=1)
    return 0


def _set_latencies(fleet, latencies: dict[str, float]) -> None:
    """Per-model latency: the scripted reply sleeps before answering (server thread)."""
    from obdask.demo import scripted_reply

    def slow(body):
        time.sleep(latencies.get(str(body.get("model")), 0.0))
        return scripted_reply(body)

    for server in fleet.values():
        server._reply_fn = slow


if __name__ == "__main__":
    sys.exit(main())
