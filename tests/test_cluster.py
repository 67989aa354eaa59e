"""Placement, lanes, warm clones and recovery on real ``dask scheduler``/``dask worker``
subprocesses (loopback, random ports, one thread per worker).

Every test reads placement back from the run record (``record["worker"]``).
The clusters come from :class:`tests.cluster_utils.ProcessCluster`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import dask
import psutil
import pytest

import obdask
from obdask.exceptions import PlacementError
from obdask.runner import RunResult
from tests.cluster_utils import (
    NO_SANDBOX,
    ProcessCluster,
    dask_env,
    git_repository,
    run_killing_a_worker,
    write_plan,
)

pytestmark = pytest.mark.slow

#: ``python`` by a name the @cmd: allowlist accepts (a path counts by its basename).
PYTHON = os.path.join(os.path.dirname(sys.executable), "python")
if not os.path.exists(PYTHON):
    PYTHON = "python"


def by_id(result: RunResult) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in result.records}


def lane_names(resources: dict[str, float]) -> list[str]:
    return sorted(k for k, v in resources.items() if k.startswith("lane-") and v > 0)


# ------------------------------------------------- resources, errors, lanes


@pytest.fixture(scope="module")
def placement_cluster(tmp_path_factory):
    """``gpu``: GPU=1, VRAM=24e9, every lane; ``lane2``: no GPU (hidden if the box has
    one: explicit ``--resources`` beat detected ones), lane 2 only."""
    with ProcessCluster(tmp_path_factory.mktemp("placement")) as cluster:
        cluster.add_worker("gpu", "--resources", "GPU=1,VRAM=24e9")
        cluster.add_worker("lane2", "--resources", "GPU=0,VRAM=0", "--lanes=2")
        cluster.wait_for("gpu", "lane2")
        yield cluster


@pytest.mark.timeout(240)
def test_gpu_steps_land_on_the_gpu_worker(placement_cluster, tmp_path):
    cluster = placement_cluster
    addr = cluster.wait_for("gpu", "lane2")
    res = cluster.resources("gpu")
    assert res["GPU"] == 1 and res["VRAM"] == 24e9
    other = cluster.resources("lane2")
    assert other["GPU"] == 0 and other["VRAM"] == 0 and other["MEM"] > 0  # MEM: detected
    lines = []
    for i in range(4):
        lines.append(f"- [ ] id=gpu.res{i} lane=2 resources=GPU:1,VRAM:16GB payload=@cmd:true")
        lines.append(f"- [ ] id=gpu.vision{i} lane=2 model=vision payload=@cmd:true")
    lines += [f"- [ ] id=plain{i} lane=2 payload=@cmd:true" for i in range(12)]
    # model=vision needs what its role in obdask.placement.models says (set here, on
    # the client, which computes every job's resources).
    vision = {"model": "llava:13b", "vram": "16GB", "gpu": 1}
    with dask.config.set({"obdask.placement.models.vision": vision}):
        result = obdask.run(write_plan(tmp_path, "gpu-placement", lines), cluster.client)
    assert result.ok, result.frame[["status", "worker", "error"]]
    frame = result.frame
    gpu_steps = [s for s in frame.index if s.startswith("gpu.")]
    assert len(gpu_steps) == 8
    assert (frame.loc[gpu_steps, "worker"] == addr["gpu"]).all(), frame.loc[gpu_steps, "worker"]
    plain = frame.loc[[s for s in frame.index if s.startswith("plain")]]
    assert set(plain.worker) <= set(addr.values())
    assert (frame.status == "done").all()


@pytest.mark.timeout(240)
def test_unplaceable_step_fails_fast(placement_cluster, tmp_path):
    cluster = placement_cluster
    plan = write_plan(tmp_path, "needs-tpu", [
        "- [ ] id=fine lane=2 payload=@cmd:true",
        "- [ ] id=wants.tpu lane=2 resources=TPU:1 payload=@cmd:true",
    ])
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        obdask.run(plan, cluster.client)
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert "wants.tpu" in message and "TPU" in message, message
    assert "no worker offers TPU" in message, message
    assert elapsed < 20, f"PlacementError took {elapsed:.1f}s"
    # Nothing was submitted: the plan holds no key on the scheduler and ran no job.
    held = cluster.client.run_on_scheduler(
        lambda dask_scheduler: [k for k in dask_scheduler.tasks if "needs-tpu" in str(k)])
    assert held == []
    assert not list(tmp_path.rglob("jobs/*.json"))  # no ledger entry: no job ran

    # The CLI: exit status 2, one `error:` line on stderr, no traceback.
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "obdask.cli", "run", str(tmp_path / "needs-tpu.md"),
         "--scheduler", str(cluster.scheduler_file)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=dask_env(),
    )
    elapsed = time.monotonic() - start
    stderr = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    # the cluster it used (one line), then the one error line
    assert len(stderr) == 2 and stderr[0].startswith("cluster: "), done.stderr
    stderr = stderr[1:]
    assert stderr[0].startswith("error: "), done.stderr
    assert "wants.tpu" in stderr[0] and "TPU" in stderr[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert elapsed < 60, f"the CLI took {elapsed:.1f}s"


@pytest.mark.timeout(240)
def test_lanes_restrict_placement(placement_cluster, tmp_path):
    cluster = placement_cluster
    addr = cluster.wait_for("gpu", "lane2")
    assert lane_names(cluster.resources("lane2")) == ["lane-2"]
    assert len(lane_names(cluster.resources("gpu"))) == 16  # no --lanes: every lane
    lines = [f"- [ ] id=l{lane}.{i} lane={lane} payload=@cmd:true"
             for i in range(8) for lane in (1, 2, 3)]
    result = obdask.run(write_plan(tmp_path, "lanes", lines), cluster.client)
    assert result.ok, result.frame[["status", "worker", "error"]]
    workers = {r["id"]: r["worker"] for r in result.records}
    for sid, worker in workers.items():
        lane = int(sid[1])
        allowed = set(addr.values()) if lane == 2 else {addr["gpu"]}
        assert worker in allowed, (sid, worker, addr)

    # Documented by test: `--lanes=1,3` (comma list, `=` form, after the preload).
    cluster.add_worker("lane13", "--lanes=1,3")
    try:
        addr = cluster.wait_for("gpu", "lane2", "lane13")
        assert lane_names(cluster.resources("lane13")) == ["lane-1", "lane-3"]
        result = obdask.run(write_plan(tmp_path, "lanes13", lines), cluster.client)
        assert result.ok, result.frame[["status", "worker", "error"]]
        for record in result.records:
            lane = int(record["id"][1])
            allowed = ({addr["gpu"], addr["lane2"]} if lane == 2
                       else {addr["gpu"], addr["lane13"]})
            assert record["worker"] in allowed, (record["id"], record["worker"], addr)
    finally:
        cluster.stop_worker("lane13")


@pytest.mark.timeout(240)
def test_attempts_recorded_for_every_job_of_a_large_plan(placement_cluster, tmp_path):
    lines = [f"- [ ] id=j{i} lane=2 payload=@cmd:true" for i in range(600)]
    result = obdask.run(write_plan(tmp_path, "large", lines), placement_cluster.client)
    assert result.ok
    assert (result.frame.attempts == 1).all(), result.frame.attempts.value_counts()


# ------------------------------------------------------------ warm clones


@pytest.mark.timeout(240)
def test_warm_clone_affinity(tmp_path):
    repos = {}
    for name in ("alpha", "beta"):
        repos[name] = (tmp_path / "repos" / name, git_repository(tmp_path / "repos" / name, name))
    lines = []
    for i in range(50):
        path, sha = repos["alpha" if i % 2 else "beta"]
        payload = "@cmd:git rev-parse HEAD" if i % 4 < 2 else "@cmd:cat README.md"
        lines.append(f"- [ ] id=j{i} lane=1 locality=git:{path}@{sha} payload={payload}")
    plan = write_plan(tmp_path / "plan", "affinity", lines)
    with ProcessCluster(tmp_path / "cluster") as cluster:
        for name in ("w1", "w2", "w3"):
            cluster.add_worker(name)
        cluster.wait_for("w1", "w2", "w3")
        result = obdask.run(plan, cluster.client)
    assert result.ok, result.frame[["status", "worker", "error"]]
    assert all(isinstance(r["warm"], bool) for r in result.records), result.frame.warm
    frame = result.frame
    frame["repo"] = ["alpha" if int(sid[1:]) % 2 else "beta" for sid in frame.index]
    placement = frame.groupby(["repo", "worker"]).size()  # for the failure message
    rate = result.summary["warm_hit_rate"]
    cold = frame[~frame.warm.astype(bool)]
    # Each (repository, worker) pair is cold once.  placement.route gives each repo one
    # home worker; the restriction is loose, so the idle third worker steals some jobs
    # of one repo and clones it too: 2-3 cold jobs of 50 seen (0.94-0.96).  The bound
    # fails only if all 3 workers end up cloning both repos (6 cold, 0.88).
    assert rate >= 0.9, (
        f"warm hit rate {rate:.2f}; cold jobs:\n{cold[['worker', 'started']]}\n{placement}")


# --------------------------------------------------------------- recovery


def _gone(proc: psutil.Process) -> bool:
    try:  # an orphan reaped by init is gone; one not reaped yet is a zombie
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(300)
def test_worker_loss_recovery_applies_each_job_once(tmp_path):
    lines_file = tmp_path / "lines.txt"
    ids = [f"j{i:03d}" for i in range(300)]
    plan = write_plan(tmp_path / "plan", "recovery", [
        f"- [ ] id={sid} lane=1 payload=@cmd:sleep 0.05 && echo {sid} >> {lines_file}"
        for sid in ids])
    # --no-nanny: the `dask worker` process *is* the worker, so SIGKILL of its pid
    # kills the process that runs the jobs and nothing restarts it (with a nanny
    # the pid would be the nanny's and the worker a child it replaces).
    with ProcessCluster(tmp_path / "cluster") as cluster:
        for name in ("w1", "w2", "w3"):
            cluster.add_worker(name, nanny=False, env=NO_SANDBOX)  # writes lines_file
        addr = cluster.wait_for("w1", "w2", "w3")
        pids = cluster.worker_pids()
        assert {pids[a] for a in addr.values()} == {p.pid for p in cluster.procs.values()}

        result, killed = run_killing_a_worker(cluster, plan, lines_file, after=60)
        dead = killed["address"]
        assert cluster.procs[next(n for n, a in addr.items() if a == dead)].wait(10) == -9
        assert dead not in cluster.workers().values()

    frame = result.frame
    assert result.ok and (frame.status == "done").all(), frame[frame.status != "done"]
    assert len(frame) == 300
    written = lines_file.read_text().split()
    assert len(written) == 300 and set(written) == set(ids), (
        sorted(w for w in set(written) if written.count(w) > 1))
    # The job cut short in its sleep ran again, elsewhere, and wrote its line once.
    # (Its record normally shows attempts == 2 and "attempt 1: worker ... lost",
    # but that needs the dead worker's "start" event to have left its batched
    # stream before the kill, which a loaded machine does not promise.)
    victim = by_id(result)[killed["step"]]
    assert victim["status"] == "done" and victim["worker"] != dead
    assert written.count(killed["step"]) == 1
    assert dead in result.summary["workers_lost"]  # the run says it lost a worker
    # Results the dead worker held were recomputed: replayed from the ledger, not re-run.
    on_dead = frame[frame.worker == dead]
    assert len(on_dead) >= 1
    assert on_dead.replayed.fillna(False).astype(bool).all(), on_dead
    assert all(any("replayed" in reason for reason in r) for r in on_dead.retries)
    assert ((frame.attempts > 1) | frame.retries.notna()).sum() >= len(on_dead)
    # The killed job's shell (stopped, so only PDEATHSIG could end it) and its sleep
    # are gone; no shell or sleep of any job is left behind.
    deadline = killed["killed_at"] + 10
    while not all(_gone(p) for p in killed["family"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in killed["family"] if not _gone(p)]
    for p in left:
        p.kill()
    assert not left, f"orphans of the dead worker: {left}"
    strays = [p for p in psutil.process_iter(["cmdline"])
              if str(lines_file) in " ".join(p.info["cmdline"] or []) and not _gone(p)]
    assert not strays, strays


# ------------------------------------------------------- killer job, nanny


@pytest.mark.timeout(300)
def test_job_that_kills_its_worker_fails_after_allowed_failures(tmp_path):
    # The job walks up its ancestors to the worker process, which the nanny
    # started with multiprocessing's spawn (``python -c 'from multiprocessing.spawn
    # import spawn_main; ...' --multiprocessing-fork``), and SIGKILLs it.  (Matching
    # a word of the cmdline would hit the job's own shell, whose cmdline holds this
    # script.)
    script = ("import os, signal, psutil; "
              "w = [p for p in psutil.Process().parents() "
              "if p.cmdline()[-1:] == ['--multiprocessing-fork']][0]; "
              "os.kill(w.pid, signal.SIGKILL)")
    plan = write_plan(tmp_path / "plan", "killer", [
        f'- [ ] id=suicide lane=1 payload=@cmd:{PYTHON} -c "{script}"',
        "- [ ] id=after lane=2 deps=suicide payload=@cmd:true",
        "- [ ] id=independent lane=2 payload=@cmd:echo fine",
    ])
    env = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    with ProcessCluster(tmp_path / "cluster", scheduler_env=env) as cluster:
        # Lanes keep the independent step off the worker that keeps dying: a task
        # merely queued there when it dies would count a failure too.
        # (no sandbox: in its PID namespace the job could not see, let alone kill, its worker)
        cluster.add_worker("doomed", "--lanes=1", env=NO_SANDBOX)  # with a nanny (default)
        cluster.add_worker("safe", "--lanes=2", env=NO_SANDBOX)
        addr = cluster.wait_for("doomed", "safe")
        first_pid = cluster.worker_pids()[addr["doomed"]]
        result = obdask.run(plan, cluster.client)
        # The nanny brought the worker back each time (new process, new address).
        back = cluster.wait_for("doomed", exclude=[addr["doomed"]])
        assert cluster.worker_pids()[back["doomed"]] != first_pid
        assert cluster.procs["doomed"].poll() is None  # the nanny itself lives
    records = by_id(result)
    suicide = records["suicide"]
    assert suicide["status"] == "failed", suicide
    assert "worker died" in suicide["error"], suicide["error"]
    assert "KilledWorker" in suicide["error"] or "died" in suicide["error"]
    assert suicide["attempts"] == 2, suicide  # allowed-failures=1: two tries
    assert any("lost" in reason for reason in suicide["retries"]), suicide
    assert records["independent"]["status"] == "done", records["independent"]
    assert records["independent"]["worker"] == addr["safe"]
    assert records["after"]["status"] == "skipped"
    assert "suicide" in records["after"]["error"]
    assert not result.ok
