"""Model-call throughput over K Ollama endpoints, and the cost of budget enforcement.

Run:  python benchmarks/bench_llm.py [--calls 200] [--slots 2] [--latency 0.2]

K = 1, 2, 4 test servers (obdask.testing.OllamaTestServer), each serving the
model with P parallel slots and a fixed per-call latency L (first-token
delay; replies are a few tokens).  200 ``call_model`` calls run as Dask tasks
on a LocalCluster (2 workers x 8 threads, enough to keep K*P calls in
flight); the cluster-wide per-(endpoint, model) cap is P.  Reported: achieved
calls/s vs the limit K*P/L (target >= 0.9 at K = 4), and the same K = 4 run
with a token budget in force (per-call cost of reserve + settle on the
scheduler).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import dask

MODEL = "bench-model:1b"


def one_call(i: int, endpoints: list[str]) -> int:
    from obdask.llm.client import call_model

    reply = call_model(MODEL, f"call {i}: say ok", endpoints=endpoints, plan="bench",
                       options={"num_predict": 4})
    return reply.total_tokens


def measure(client, endpoints: list[str], calls: int) -> float:
    start = time.perf_counter()
    futures = [client.submit(one_call, i, endpoints, pure=False) for i in range(calls)]
    client.gather(futures)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from distributed import Client, LocalCluster

    from obdask.llm import budget
    from obdask.testing import OllamaTestServer

    rows = []
    settings = {"obdask.llm.slots": args.slots, "obdask.llm.backoff": "0.05s"}
    servers = [OllamaTestServer(models=[MODEL], num_parallel=args.slots,
                                first_token_latency=args.latency, reply_tokens=(2, 2)).start()
               for _ in range(4)]
    try:
        with dask.config.set(settings), \
                LocalCluster(n_workers=2, threads_per_worker=8, processes=True,
                             dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster, \
                Client(cluster) as client:
            measure(client, [servers[0].url], 8)  # warm-up: imports, semaphores
            print(f"{'K':>2}{'P':>3}{'L s':>6}{'calls/s':>9}{'limit':>8}{'ratio':>7}  budget")
            for k in (1, 2, 4):
                urls = [s.url for s in servers[:k]]
                times = [measure(client, urls, args.calls) for _ in range(args.repeat)]
                rows.append(_row(k, args, statistics.median(times), budget=False))
            budget.install(client)
            budget.set_budget(client, "bench", 10**12, scope="plan", match="bench")
            urls = [s.url for s in servers]
            times = [measure(client, urls, args.calls) for _ in range(args.repeat)]
            rows.append(_row(4, args, statistics.median(times), budget=True))
            state = budget.budgets(client).loc["bench"]
            assert state["calls"] == args.calls * args.repeat, state  # it was enforced
            print(f"budget 'bench': {state['calls']} calls settled, {state['used']} tokens used")
    finally:
        for server in servers:
            server.stop()
    plain, budgeted = rows[2], rows[3]
    per_call_ms = (budgeted["seconds"] - plain["seconds"]) / args.calls * 1000
    print(f"\nbudget enforcement at K=4: {per_call_ms:+.2f} ms per call of wall time "
          f"({budgeted['seconds']:.2f}s vs {plain['seconds']:.2f}s for {args.calls} calls)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "budget_ms_per_call": per_call_ms}, f, indent=1)
    return 0


def _row(k: int, args, seconds: float, budget: bool) -> dict:
    rate = args.calls / seconds
    limit = k * args.slots / args.latency
    row = {"K": k, "P": args.slots, "L": args.latency, "seconds": seconds,
           "calls_per_s": rate, "limit": limit, "ratio": rate / limit, "budget": budget}
    print(f"{k:>2}{args.slots:>3}{args.latency:>6.2f}{rate:>9.2f}{limit:>8.2f}"
          f"{row['ratio']:>7.2f}  {'on' if budget else 'off'}", flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
