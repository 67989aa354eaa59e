"""Launcher-level cost of the sandbox and of the per-job pids cgroup: ``run_command("true")``.

Sandbox ``off``/``auto`` x ``obdask.cmd.pids-max`` null/1024, 40 commands per
round, interleaved rounds; prints the median and best ms per command.

    python benchmarks/bench_sandbox_launcher.py --rounds 5 --per-round 40
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import dask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=40)
    args = parser.parse_args()

    from obdask.payloads.cmd import run_command

    ws = tempfile.mkdtemp()
    cases = [(mode, pids) for mode in ("off", "auto") for pids in (None, 1024)]
    times: dict[tuple[str, int | None], list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for mode, pids in cases:
            with dask.config.set({"obdask.cmd.sandbox.mode": mode,
                                  "obdask.cmd.pids-max": pids}):
                run_command("true", ws)  # warm: probe, caches, cgroup pool
                start = time.perf_counter()
                for _ in range(args.per_round):
                    assert run_command("true", ws).ok
                took = time.perf_counter() - start
                times[(mode, pids)].append(1000 * took / args.per_round)
    for (mode, pids), values in times.items():
        print(f"sandbox {mode:4s} pids-max {pids!s:5s} median {statistics.median(values):6.2f} "
              f"ms/command, best {min(values):6.2f}")


if __name__ == "__main__":
    main()
