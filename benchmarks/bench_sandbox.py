"""Per-job cost of the bubblewrap sandbox: ``@cmd:true`` x N with and without it, one cluster.

One embedded LocalCluster (2 workers x 1 thread) runs a plan of N independent
``@cmd:true`` steps repeatedly, the workers' ``obdask.cmd.sandbox.mode``
switched between ``off`` and ``require`` before each run (interleaved, so
load from elsewhere hits both alike).  Prints seconds per run, ms per job
and the ratio of the best runs (sandbox / none).

    python benchmarks/bench_sandbox.py --jobs 500 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path


def _set_mode(mode: str) -> None:
    import dask

    dask.config.set({"obdask.cmd.sandbox.mode": mode})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    import obdask
    from obdask.payloads import sandbox

    if sandbox.unavailable_reason() is not None:
        raise SystemExit(f"bwrap cannot run here: {sandbox.unavailable_reason()}")
    lines = "".join(f"- [ ] id=t{i} lane=1 payload=@cmd:true\n" for i in range(args.jobs))
    times: dict[str, list[float]] = {"off": [], "require": []}
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                         dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        for r in range(args.repeat + 1):  # the first round warms the workers up
            for mode in ("off", "require"):
                client.run(_set_mode, mode)
                folder = Path(tmp) / f"{mode}-{r}"
                folder.mkdir()
                plan = folder / "plan.md"
                plan.write_text(lines)
                start = time.perf_counter()
                result = obdask.run(plan, client, workspace=folder)
                took = time.perf_counter() - start
                assert result.ok, result.frame[result.frame.status != "done"].head()
                if r:
                    times[mode].append(took)
                print(f"round {r} {mode:8s} {took:7.2f} s  {1000 * took / args.jobs:6.2f} ms/job"
                      + ("  (warm-up)" if not r else ""), flush=True)
    best = {mode: min(v) for mode, v in times.items()}
    out = {"jobs": args.jobs, "workers": args.workers, "best_s": best,
           "ms_per_job": {m: 1000 * s / args.jobs for m, s in best.items()},
           "ratio": best["require"] / best["off"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
