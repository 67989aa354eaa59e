"""Which cluster a run uses: Dask's own resolution order, said in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import dask
import pytest

import obdask
from obdask.cluster import configured_scheduler
from obdask.exceptions import ClusterUnreachable


def obdask_cli(*args, env=None, timeout=120):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SCHEDULER")}
    return subprocess.run([sys.executable, "-m", "obdask.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**environ, **(env or {})})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resolution_order():
    with dask.config.set({"scheduler-address": "tcp://10.0.0.1:8786"}):
        assert configured_scheduler("tcp://1.2.3.4:1")[0] == "tcp://1.2.3.4:1"
        assert configured_scheduler()[0] == "tcp://10.0.0.1:8786"
    with dask.config.set({"scheduler-address": None, "scheduler-file": "/x/s.json"}):
        assert configured_scheduler()[0] == "/x/s.json"
    with dask.config.set({"scheduler-address": None, "scheduler-file": None}):
        assert configured_scheduler() == (None, "embedded")


def test_run_uses_dask_scheduler_address(tmp_path, cluster_client):
    plan = tmp_path / "plan.md"
    plan.write_text("- [ ] id=a lane=1 payload=@cmd:true\n")
    done = obdask_cli("run", plan, "--json",
                      env={"DASK_SCHEDULER_ADDRESS": cluster_client.scheduler.address})
    assert done.returncode == 0, done.stderr
    assert f"cluster: {cluster_client.scheduler.address}" in done.stderr
    assert "DASK_SCHEDULER_ADDRESS" in done.stderr
    # and from Python, with no client given
    with dask.config.set({"scheduler-address": cluster_client.scheduler.address}):
        result = obdask.run(plan)
    assert result.ok
    workers = set(cluster_client.scheduler_info()["workers"])
    assert {r["worker"] for r in result.records} <= workers


def test_embedded_cluster_is_announced(tmp_path):
    plan = tmp_path / "plan.md"
    plan.write_text("- [ ] id=a lane=1 payload=@cmd:true\n")
    done = obdask_cli("run", plan, "--json", env={"DASK_OBDASK__RUN__N_WORKERS": "1"})
    assert done.returncode == 0, done.stderr
    assert "cluster: embedded LocalCluster, 1 workers, dashboard http://127.0.0.1:" in done.stderr


def test_refused_connection_fails_at_once(tmp_path):
    plan = tmp_path / "plan.md"
    plan.write_text("- [ ] id=a lane=1 payload=@cmd:true\n")
    address = f"tcp://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match="connection refused"):
        with dask.config.set({"scheduler-address": address, "obdask.run.connect-timeout": 30}):
            obdask.run(plan)
    assert time.monotonic() - started < 10  # not the 30 s connect timeout
    done = obdask_cli("budgets", env={"DASK_SCHEDULER_ADDRESS": address})
    assert done.returncode != 0 and "connection refused" in done.stderr
    assert "Traceback" not in done.stderr
