"""Sessions on a cluster: driver overhead and model-call throughput (ratios, not seconds).

1. One scripted session (the orchestrator takes the default moves; every model call waits
   ``--latency`` s before its first token): wall time vs its critical path (the model
   calls, one after another): ``ratio = wall / (calls * latency)``; target <= 1.1 at
   realistic latencies.  Also the driver overhead per model call, in ms.
2. ``--sessions`` sessions at once on one cluster, every role on one model with
   ``--parallel`` slots on one endpoint: achieved model calls/s vs the limit
   ``K * P / L`` (K endpoints, P slots, L latency); target >= 0.9.

    python benchmarks/bench_sessions.py --latency 0.5 --sessions 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time

import dask

FLOW = re.compile(r"^flow code: (\S+)$", re.M)


def reply(body):
    from obdask.session.model import SessionState

    text = body["messages"][-1]["content"]
    if isinstance(body.get("format"), dict):
        code = FLOW.search(text).group(1)
        move = SessionState.from_flow_code("" if code == "-" else code).default_move()
        return json.dumps(move.to_dict() | {"justification": "default"})
    return "done."


def store_loop(sessions: int = 3) -> dict:
    """The durable part of a transition alone (local disk, no model, no cluster): the
    loop of docs/sessions.md, ``begin_call`` + ``record_tokens`` + ``append_process``."""
    import os

    from obdask.session.model import MoveKind, SessionState
    from obdask.session.store import SessionStore

    store = SessionStore(tempfile.mkdtemp(prefix="bench-session-store-"))
    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd):  # count what the store asks the disk for
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    os.fsync = counting_fsync
    transitions = 0
    t0 = time.perf_counter()
    try:
        for i in range(sessions):
            sid = f"loop-{i}"
            store.create(sid, "p", epoch=1)
            state = SessionState()
            while not state.finished:
                move = state.default_move()
                if move.kind is MoveKind.FINISH:
                    state = state.apply(move)
                    store.update(sid, 1, state=state)
                    break
                nxt = state.apply(move)
                ticket = store.begin_call(sid, 1, nxt.processes_run, nxt.position)
                store.record_tokens(sid, 1, ticket, model="m", input_tokens=1,
                                    output_tokens=1)
                store.append_process(sid, 1, nxt, {"output": "x"}, started=0, ended=1)
                state, transitions = nxt, transitions + 1
    finally:
        os.fsync = real_fsync
    wall = time.perf_counter() - t0
    return {"transitions": transitions, "ms_per_transition": wall / transitions * 1000,
            "fsyncs_per_transition": fsyncs / transitions}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--sessions", type=int, default=20,
                        help="sessions at once for the throughput part (0: skip it)")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from obdask.session.api import Session
    from obdask.testing import OllamaTestServer

    out: dict = {"latency_s": args.latency, "store": store_loop()}
    print(f"store alone: {out['store']['ms_per_transition']:.1f} ms and "
          f"{out['store']['fsyncs_per_transition']:.1f} fsyncs per transition "
          f"(vs {2 * args.latency * 1000:.0f} ms of model latency per transition)")
    store = tempfile.mkdtemp(prefix="bench-sessions-")
    with OllamaTestServer(models=["m:1b"], replies=reply, num_parallel=args.parallel,
                          first_token_latency=args.latency) as server, \
            LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                         processes=False, dashboard_address=":0",
                         silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        models = {r: {"model": "m:1b", "gpu": 0, "vram": 0}
                  for r in ("orchestrator", "coder", "researcher")}
        with dask.config.set({"obdask.llm.endpoints": [server.url],
                              "obdask.placement.models": models,
                              "obdask.llm.slots": args.parallel,
                              "obdask.sessions.store": store,
                              "obdask.sessions.consultation-timeout": "0s"}):
            Session.start(client, "warm up").wait(timeout=600, poll=0.01)
            n0 = len(server.stats.calls)
            t0 = time.perf_counter()
            state = Session.start(client, "one session").wait(timeout=600, poll=0.01)
            wall = time.perf_counter() - t0
            calls = len(server.stats.calls) - n0
            crit = calls * args.latency
            # the calls as the server served them (its own handling and token stream on
            # top of the latency): what is left of the wall time is the client side
            served = sum(c["total_duration"] for c in server.stats.calls[n0:]) / 1e9
            out["single"] = {"state": state["state"], "calls": calls, "wall_s": wall,
                             "critical_path_s": crit, "ratio": wall / crit,
                             "overhead_ms_per_call": (wall - crit) / calls * 1000,
                             "served_s": served, "ratio_served": wall / served}
            print(f"one session: {calls} model calls, wall {wall:.2f}s vs critical path "
                  f"{crit:.2f}s: ratio {wall / crit:.3f} (target <= 1.1), "
                  f"{(wall - crit) / calls * 1000:.0f} ms overhead per call; vs the calls "
                  f"as served ({served:.2f}s): {wall / served:.3f}")
            if args.sessions > 0:
                n0 = len(server.stats.calls)
                t0 = time.perf_counter()
                handles = [Session.start(client, f"session {i}") for i in range(args.sessions)]
                states = [h.wait(timeout=1200, poll=0.05)["state"] for h in handles]
                wall = time.perf_counter() - t0
                calls = len(server.stats.calls) - n0
                limit = 1 * args.parallel / args.latency
                out["concurrent"] = {"sessions": args.sessions, "done": states.count("done"),
                                     "calls": calls, "wall_s": wall,
                                     "calls_per_s": calls / wall, "limit_per_s": limit,
                                     "ratio": calls / wall / limit,
                                     "peak_concurrency": server.stats.peak("m:1b")}
                print(f"{args.sessions} sessions at once: {calls} calls in {wall:.1f}s = "
                      f"{calls / wall:.2f}/s vs K*P/L = {limit:.2f}/s: ratio "
                      f"{calls / wall / limit:.2f} (target >= 0.9); "
                      f"{states.count('done')} done")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
