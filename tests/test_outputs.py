"""Outputs a user can read: ``obdask show ... --stdout``, stderr tails, ``obdask logs``,
loaded outputs and integer columns in ``RunResult``, ``.obdask/.gitignore``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_cli import obdask


@pytest.fixture
def two_jobs(tmp_path):
    path = tmp_path / "out.md"
    path.write_text(
        "# Plan: out\n"
        "- [ ] id=hello lane=1 payload=@cmd:echo hi there\n"
        "- [ ] id=bad lane=1 payload=@cmd:echo first >&2; echo the reason >&2; exit 3\n"
    )
    return path


def test_show_prints_stored_stdout_and_stderr(two_jobs):
    run = obdask("run", two_jobs, "--workers", "1", "--json")
    assert run.returncode == 1, run.stderr
    run_id = json.loads(run.stdout)["run_id"]
    out = obdask("show", two_jobs, run_id, "hello", "--stdout")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hi there\n"
    latest = obdask("show", two_jobs, "bad", "--stderr")  # JOB without RUN_ID: the latest
    assert latest.returncode == 0, latest.stderr
    assert latest.stdout == "first\nthe reason\n"
    one = obdask("show", two_jobs, "hello")  # a job without a stream flag: its record
    assert one.returncode == 0 and "hello" in one.stdout and "stdout" in one.stdout
    for args, message in [(("hello", "--reply"), "job 'hello' has no reply"),
                          (("nope", "--stdout"), "no job 'nope' in run"),
                          (("--stdout",), "--stdout needs a JOB")]:
        wrong = obdask("show", two_jobs, *args)
        assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr
        assert wrong.stderr.count("\n") == 1 and message in wrong.stderr, wrong.stderr


def test_run_summary_shows_the_stderr_tail_of_failed_jobs(two_jobs):
    run = obdask("run", two_jobs, "--workers", "1")
    assert run.returncode == 1
    assert "bad: stderr (last lines):" in run.stdout, run.stdout
    assert "    first\n    the reason\n" in run.stdout


def test_obdask_folder_gets_its_own_gitignore(two_jobs):
    obdask("run", two_jobs, "--workers", "1", "--json")
    ignore = two_jobs.parent / ".obdask" / ".gitignore"
    assert ignore.read_text() == "*\n"


def test_frame_keeps_integers_and_loads_outputs(two_jobs, cluster_client):
    import pandas as pd

    import obdask

    result = obdask.run(two_jobs, cluster_client)
    frame = result.frame
    assert str(frame["exit_code"].dtype) == "Int64"
    assert str(frame["attempts"].dtype) == "Int64"
    assert str(frame["stdout_bytes"].dtype) == "Int64"
    assert frame.loc["bad", "exit_code"] == 3 and frame.loc["hello", "exit_code"] == 0
    assert result.output("hello", "stdout") == "hi there\n"
    assert result.output("bad", "stderr") == "first\nthe reason\n"
    assert result.output("bad", "stdout") is None  # the job wrote nothing there
    loaded = result.to_frame(outputs=["stdout", "stderr"])
    assert loaded.loc["hello", "stdout"] == "hi there\n"
    assert pd.isna(loaded.loc["hello", "stderr"])
    with pytest.raises(obdask.ObdaskError, match="no job 'zz'"):
        result.output("zz")
    with pytest.raises(obdask.ObdaskError, match="one of stdout, stderr, reply, diff"):
        result.output("hello", "stdin")


def test_logs_follows_a_running_plan(tmp_path):
    path = tmp_path / "slow.md"
    path.write_text("# Plan: slow\n"
                    "- [ ] id=first lane=1 payload=@cmd:echo one\n"
                    "- [ ] id=second lane=1 deps=first payload=@cmd:sleep 4\n")
    logs = subprocess.Popen([sys.executable, "-m", "obdask.cli", "logs", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = subprocess.Popen([sys.executable, "-m", "obdask.cli", "run", str(path),
                            "--workers", "1", "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        line = logs.stdout.readline()
        assert line.split()[:2] == ["first", "done"], line
        assert run.poll() is None  # printed while the run still goes on
        rest, err = logs.communicate(timeout=120)
        assert logs.returncode == 0, err
        assert rest.splitlines()[0].split()[:2] == ["second", "done"]
        assert "slow: ok" in rest
        assert run.wait(timeout=60) == 0
    finally:
        for proc in (logs, run):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    again = obdask("logs", path)  # a finished run: its jobs, then the end, at once
    assert again.returncode == 0 and "first" in again.stdout and "slow: ok" in again.stdout
