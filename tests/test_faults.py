"""Faults with real ``dask scheduler`` / ``dask worker`` processes (slow tier)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cluster_utils import ProcessCluster

pytestmark = pytest.mark.slow


def _plan(tmp_path, n, sleep="0.2"):
    plan = tmp_path / "plan.md"
    plan.write_text("plan_id=faulty\n" + "".join(
        f"- [ ] id=s{i} lane=1 payload=@cmd:sleep {sleep} && echo {i} >> out.txt\n"
        for i in range(n)))
    return plan


@pytest.mark.timeout(300)
def test_losing_the_scheduler_is_one_line_and_records_what_finished(tmp_path):
    plan = _plan(tmp_path, 40)
    with ProcessCluster(tmp_path / "cluster") as cluster:
        cluster.add_worker("w1")
        cluster.add_worker("w2")
        cluster.wait_for("w1", "w2")
        proc = subprocess.Popen(
            [sys.executable, "-m", "obdask.cli", "run", str(plan), "--json", "--scheduler",
             cluster.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=tmp_path)
        deadline = time.monotonic() + 120
        out = tmp_path / "out.txt"
        while not (out.exists() and len(out.read_text().splitlines()) >= 5):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        cluster.scheduler.kill()
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "scheduler" in errors[0] and "--resume" in errors[0], stderr
    assert "Traceback" not in stderr, stderr
    result = json.loads(stdout)  # --json is still one object
    assert result["ok"] is False and result["interrupted"] == "scheduler lost"
    assert all(j["key"] == f"faulty::{j['id']}" for j in result["jobs"])
    done = {j["id"] for j in result["jobs"] if j["status"] == "done"}
    written = {f"s{line.strip()}" for line in out.read_text().splitlines()}
    assert len(done) >= 5 and done <= written  # every job that finished has its record
    records = list((tmp_path / ".obdask" / "records" / "faulty").glob("*/records.jsonl"))
    assert len(records) == 1 and len(records[0].read_text().splitlines()) == 40


@pytest.mark.timeout(300)
def test_a_frozen_worker_is_removed_and_its_jobs_run_elsewhere(tmp_path):
    plan = _plan(tmp_path, 12, sleep="0.5")
    env = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s"}
    with ProcessCluster(tmp_path / "cluster", scheduler_env=env) as cluster:
        frozen = cluster.add_worker("frozen", nanny=False)
        cluster.add_worker("alive")
        cluster.wait_for("frozen", "alive")
        proc = subprocess.Popen(
            [sys.executable, "-m", "obdask.cli", "run", str(plan), "--json", "--scheduler",
             cluster.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=tmp_path)
        out = tmp_path / "out.txt"
        deadline = time.monotonic() + 120
        while not out.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            stdout, stderr = proc.communicate(timeout=150)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["ok"] and len(result["jobs"]) == 12
    assert result["workers_lost"], result


@pytest.mark.timeout(300)
def test_two_runs_on_separate_embedded_clusters_do_not_overlap(tmp_path):
    # Regression: each `obdask run` started its own cluster, so both ran every job.
    plan = tmp_path / "plan.md"
    plan.write_text("plan_id=twice\n" + "".join(
        f"- [ ] id=s{i} lane=1 payload=@cmd:echo {i} >> count.txt && sleep 1.5\n"
        for i in range(20)))
    env = {**os.environ, "DASK_OBDASK__RUN__N_WORKERS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "obdask.cli", "run", str(plan), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=tmp_path)
    count = tmp_path / "count.txt"
    deadline = time.monotonic() + 120
    while not count.exists():
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(
        [sys.executable, "-m", "obdask.cli", "run", str(plan), "--json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**env, "DASK_OBDASK__RUN__BUSY_PLAN_WAIT": "0s"})
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 2 and "already running" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert sorted(count.read_text().split(), key=int) == [str(i) for i in range(20)]
    assert not list((tmp_path / ".obdask" / "records" / "twice").glob("running.lock"))
