"""Cost of placement annotations, and warm-clone hit rate, on one LocalCluster.

Run:  python benchmarks/bench_placement.py [--repeat 3] [--jobs 2000] [--json out.json]

Measures, in one process and on one cluster (2 worker processes x 1 thread):

* the same ``@cmd:true`` plan (2000 independent jobs) with placement
  annotations and without.  *Annotated*: every step has ``resources=CPU:1``
  and ``lane=1`` while lanes are active (the workers offer ``lane-1`` and
  ``lane-2`` only, so each job also asks for ``lane-1``); each job is a
  resource-restricted task.  *Plain*: ``lane=0`` and no ``resources=``, so
  the jobs carry no annotation at all.  Medians of ``--repeat`` runs,
  interleaved so drift hits both alike; target ratio annotated/plain <= 1.1.
* warm-clone affinity under load: a 200-job plan over 4 fresh git
  repositories (``locality=git:<repo>@<sha>``) on the 2 busy workers; the
  run's ``warm_hit_rate`` and cold clones (at best 4: one per repository).

See docs/cluster.md (lanes, locality) and docs/performance.md.
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
from typing import Any

import obdask
from obdask.plan import Plan

#: Resources of each LocalCluster worker: two lanes of 16 make lanes active.
WORKER_RESOURCES = {"CPU": 4, "lane-1": 1e6, "lane-2": 1e6}


def plan_text(name: str, jobs: int, annotated: bool) -> str:
    """An independent ``@cmd:true`` plan; ``annotated`` adds resources and a lane."""
    fields = "lane=1 resources=CPU:1" if annotated else "lane=0"
    lines = [f"# Plan: {name}", f"plan_id={name}", ""]
    lines += [f"- [ ] id=j{i} {fields} payload=@cmd:true" for i in range(jobs)]
    return "\n".join(lines) + "\n"


def write(folder: str, name: str, text: str) -> Plan:
    path = os.path.join(folder, f"{name}.md")
    with open(path, "w") as f:
        f.write(text)
    return Plan.from_file(path)


def timed_run(client: Any, plan: Plan) -> tuple[float, Any]:
    start = time.perf_counter()
    result = obdask.run(plan, client)
    elapsed = time.perf_counter() - start
    assert result.ok, result.frame.status.value_counts()
    return elapsed, result


def annotation_overhead(client: Any, folder: str, jobs: int, repeat: int) -> dict[str, Any]:
    """Median seconds of the plain and the annotated plan, interleaved."""
    plain = write(folder, "plain", plan_text("plain", jobs, annotated=False))
    annotated = write(folder, "annotated", plan_text("annotated", jobs, annotated=True))
    times: dict[str, list[float]] = {"plain": [], "annotated": []}
    for i in range(repeat):
        order = [("plain", plain), ("annotated", annotated)]
        if i % 2:
            order.reverse()
        for name, plan in order:
            elapsed, _ = timed_run(client, plan)
            times[name].append(elapsed)
    row = {"jobs": jobs, "repeat": repeat,
           "plain_s": statistics.median(times["plain"]),
           "annotated_s": statistics.median(times["annotated"]),
           "plain_all": times["plain"], "annotated_all": times["annotated"]}
    row["ratio"] = row["annotated_s"] / row["plain_s"]
    return row


def check_annotations(client: Any, folder: str) -> dict[str, Any]:
    """What the two plans compile to on this cluster's workers (no run)."""
    from obdask.placement import ClusterView, place
    from obdask.runner import prepare
    from obdask.server import install

    install(client)  # as obdask.run does first: workers without lanes would get all
    view = ClusterView(workers=client.scheduler_info(n_workers=-1)["workers"])
    out = {"lanes_active": view.lanes_active}
    for name, annotated in (("plain", False), ("annotated", True)):
        plan = write(folder, f"check-{name}", plan_text(f"check-{name}", 1, annotated))
        compiled, _ = prepare(plan)
        place(compiled, view)
        out[name] = compiled.runnable[0].resources
    return out


def git_repo(path: str, name: str) -> str:
    """A one-commit repository at ``path``; returns its HEAD sha."""
    os.makedirs(path)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(f"# {name}\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com"}
    for args in (["init", "-q"], ["add", "README.md"], ["commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=path, check=True, env=env, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True, text=True,
                          capture_output=True).stdout.strip()


def locality_hit_rate(client: Any, folder: str, jobs: int, repos: int,
                      repeat: int) -> dict[str, Any]:
    """Hit rate of a plan over ``repos`` fresh repositories, ``repeat`` times."""
    runs = []
    for r in range(repeat):
        shas = []
        for k in range(repos):  # fresh repositories: every worker starts cold
            path = os.path.join(folder, f"repos{r}", f"repo{k}")
            shas.append((path, git_repo(path, f"repo{k}")))
        lines = [f"# Plan: locality{r}", f"plan_id=locality{r}", ""]
        for i in range(jobs):
            path, sha = shas[i % repos]
            lines.append(f"- [ ] id=j{i} lane=1 locality=git:{path}@{sha} "
                         "payload=@cmd:git rev-parse HEAD")
        plan = write(folder, f"locality{r}", "\n".join(lines) + "\n")
        elapsed, result = timed_run(client, plan)
        recs = result.records
        per_repo = [len({rec["worker"] for rec in recs if int(rec["id"][1:]) % repos == k})
                    for k in range(repos)]
        runs.append({"seconds": elapsed, "hit_rate": result.summary["warm_hit_rate"],
                     "cold": sum(1 for rec in recs if not rec["warm"]),
                     "workers_per_repo": statistics.mean(per_repo)})
    return {"jobs": jobs, "repos": repos, "workers": 2, "best_cold": repos,
            "best_hit_rate": 1 - repos / jobs, "runs": runs,
            "hit_rate_median": statistics.median(r["hit_rate"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--locality-jobs", type=int, default=200)
    parser.add_argument("--repos", type=int, default=4)
    parser.add_argument("--json", default=None, help="write results to this file")
    args = parser.parse_args(argv)
    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory() as folder, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=":0", silence_logs=logging.CRITICAL,
                         resources=WORKER_RESOURCES) as cluster, \
            Client(cluster) as client:
        compiled = check_annotations(client, folder)
        overhead = annotation_overhead(client, folder, args.jobs, args.repeat)
        locality = locality_hit_rate(client, folder, args.locality_jobs, args.repos,
                                     args.repeat)

    print(f"annotations of one job: plain {compiled['plain']}, "
          f"annotated {compiled['annotated']} (lanes active: {compiled['lanes_active']})")
    print(f"\n{'case':<34}{'jobs':>6}{'median s':>10}{'runs s':>24}")
    for name in ("plain", "annotated"):
        runs = " ".join(f"{t:.2f}" for t in overhead[f"{name}_all"])
        print(f"{'cmd-true-' + name:<34}{overhead['jobs']:>6}{overhead[name + '_s']:>10.3f}"
              f"{runs:>24}")
    verdict = "ok" if overhead["ratio"] <= 1.1 else "ABOVE TARGET"
    print(f"{'ratio annotated/plain':<34}{'':>6}{overhead['ratio']:>10.3f}"
          f"   (target <= 1.1: {verdict})")
    print(f"\nlocality: {locality['jobs']} jobs over {locality['repos']} repos on "
          f"{locality['workers']} workers (best: {locality['best_cold']} cold, "
          f"hit rate {locality['best_hit_rate']:.3f})")
    print(f"{'run':>4}{'seconds':>10}{'hit rate':>10}{'cold':>6}{'workers/repo':>14}")
    for i, r in enumerate(locality["runs"]):
        print(f"{i:>4}{r['seconds']:>10.2f}{r['hit_rate']:>10.3f}{r['cold']:>6}"
              f"{r['workers_per_repo']:>14.2f}")
    print(f"median hit rate {locality['hit_rate_median']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"annotations": compiled, "overhead": overhead, "locality": locality,
                       "python": sys.version.split()[0]}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
