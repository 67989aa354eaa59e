"""``obdask demo`` end to end, as a user runs it: a subprocess of the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import psutil


def _marked(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``mark`` (the demo and its children)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("OBDASK_DEMO_TEST") == mark:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_demo_prints_verdict_and_leaves_nothing_running(tmp_path):
    mark = uuid.uuid4().hex
    env = {**os.environ, "OBDASK_DEMO_TEST": mark}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "obdask.cli", "demo"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("SIMULATION:")
    verdict = next(line for line in lines if line.startswith("verdict: "))
    assert verdict.split()[1] in ("ACCEPTABLE", "NEEDS_IMPROVEMENT", "EXCEPTIONAL")
    assert "plan quickstart: ok" in out.stdout
    assert "TLDR" in out.stdout
    # obdask's own page of the dashboard (the one hold_dashboard prints), not Dask's /status
    assert re.search(r"^dashboard: http://\S+/obdask$", out.stdout, re.M), out.stdout[-2000:]
    flow = re.search(r"^session \S+: done, flow code (\S+)$", out.stdout, re.M)
    assert flow and flow.group(1) == "S1P123S2P123S3P123S4P123S5P123"
    assert len([line for line in lines if line.startswith("verdict: ")]) == 2  # run, session
    assert os.path.exists(next(line.split(": ", 1)[1] for line in lines
                               if line.startswith("stored: "))) is False  # temp folder gone
    time.sleep(0.5)
    assert _marked(mark) == []
    print(f"obdask demo took {took:.1f}s")
