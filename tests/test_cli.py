"""The ``obdask`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def obdask(*args, cwd=None, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "obdask.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "demo.md"
    path.write_text(
        "# Plan: demo\n"
        "- [ ] id=hello lane=1 payload=@cmd:echo hi > hi.txt\n"
        "- [ ] id=note lane=1 deps=hello payload=@doc:just a note\n"
        "- [ ] id=bye lane=2 deps=note resources=CPU:1 retries=1 payload=@cmd:cat hi.txt\n"
    )
    return path


def test_validate_ok_and_errors(plan_file, tmp_path):
    done = obdask("validate", plan_file)
    assert done.returncode == 0 and "3 steps" in done.stdout
    bad = tmp_path / "bad.md"
    bad.write_text("- [ ] id=a lane=x payload=@cmd:true\n"
                   "- [ ] id=b lane=1 deps=zz payload=@cmd:true\n")
    failed = obdask("validate", bad)
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "bad.md:1" in lines[0] and "bad.md:2" in lines[1]
    assert "Traceback" not in failed.stderr


def test_validate_reports_what_run_would_refuse(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text("- [ ] id=a lane=1 payload=@cmd:rm -rf x\n"
                   "- [ ] id=b lane=1 deps=c payload=@cmd:echo $(whoami)\n"
                   "- [ ] id=c lane=1 deps=b payload=@cmd:true\n")
    failed = obdask("validate", bad)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert [line.split(": ", 2)[1].rsplit(":", 1)[1] for line in lines] == ["1", "2", "2"]
    assert "'rm' is not on the allowlist" in lines[0]
    assert "dependency cycle" in failed.stderr and "substitution $(...) is refused" in failed.stderr


@pytest.mark.parametrize("command", ["validate", "explain", "run"])
def test_special_file_as_plan_is_one_line_not_a_hang(tmp_path, command):
    fifo = tmp_path / "plan.md"
    os.mkfifo(fifo)
    result = obdask(command, fifo, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {fifo}: not a regular file (a FIFO); a plan "
                                      "must be a markdown file")


def test_missing_plan_file_is_one_line(tmp_path):
    result = obdask("run", tmp_path / "nope.md")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.md'}: plan file not found"


def test_explain_json_needs_no_cluster(plan_file):
    result = obdask("explain", plan_file, "--json")
    assert result.returncode == 0
    jobs = {j["key"]: j for j in json.loads(result.stdout)["jobs"]}
    assert jobs["demo::note"]["action"] == "done-at-compile"
    assert jobs["demo::bye"]["deps"] == ["demo::note"]
    assert jobs["demo::bye"]["resources"] == {"CPU": 1.0} and jobs["demo::bye"]["retries"] == 1
    text = obdask("explain", plan_file)
    assert "demo::hello" in text.stdout and "[done-at-compile]" in text.stdout


def test_hash_prints_sha1(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"abc")
    result = obdask("hash", path)
    assert result.stdout.split()[0] == "a9993e364706816aba3e25717850c26c9cd0d89d"
    assert obdask("hash", tmp_path / "none").returncode == 2


def test_run_json_prints_only_json(plan_file, tmp_path):
    result = obdask("run", plan_file, "--json", "--workers", "1")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)  # nothing but one JSON object on stdout
    assert payload["ok"] is True and payload["plan"] == "demo"
    statuses = {j["id"]: j["status"] for j in payload["jobs"]}
    assert statuses == {"hello": "done", "note": "done-at-compile", "bye": "done"}
    assert set(payload["jobs"][0]) >= {"id", "status", "worker", "exit_code", "duration_s",
                                       "error"}
    assert (tmp_path / "hi.txt").read_text() == "hi\n"


def test_run_failure_exits_one_with_summary(tmp_path):
    path = tmp_path / "fails.md"
    path.write_text("- [ ] id=ok lane=1 payload=@cmd:true\n"
                    "- [ ] id=bad lane=1 payload=@cmd:rm -rf /tmp/whatever\n"
                    "- [ ] id=dep lane=1 deps=bad payload=@cmd:true\n")
    result = obdask("run", path, "--workers", "1")
    assert result.returncode == 1
    assert "FAILED" in result.stdout and "rm" in result.stdout and "skipped" in result.stdout
    assert "Traceback" not in result.stderr
    resumed = obdask("run", path, "--workers", "1", "--resume", "--json")
    statuses = {j["id"]: j["status"] for j in json.loads(resumed.stdout)["jobs"]}
    assert statuses["ok"] == "resumed" and statuses["bad"] == "failed"


def test_unreachable_scheduler_is_a_clear_error(plan_file):
    result = obdask("run", plan_file, "--scheduler", "tcp://127.0.0.1:9",
                    env={"DASK_OBDASK__RUN__CONNECT_TIMEOUT": "2s"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    # nothing listens on port 9: refused at once, not after the connect timeout
    assert "no scheduler at tcp://127.0.0.1:9: connection refused" in result.stderr


@pytest.mark.parametrize("target, contents, message", [
    ("notaurl", None, "is not a scheduler address (missing port number"),
    ("missing.json", None, "does not exist (waited 1s)"),
    ("broken.json", "{bad", "is unreadable or has no 'address'"),
    ("noaddr.json", '{"id": 1}', "is unreadable or has no 'address'"),
    ("dead.json", '{"address": "tcp://127.0.0.1:9"}',
     "no scheduler at tcp://127.0.0.1:9 (from "),
])
def test_bad_scheduler_argument_is_one_line(plan_file, tmp_path, target, contents, message):
    if contents is not None:
        (tmp_path / target).write_text(contents)
    result = obdask("run", plan_file, "--scheduler", target, cwd=tmp_path, timeout=60,
                    env={"DASK_OBDASK__RUN__CONNECT_TIMEOUT": "1s"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


def test_dask_cli_entry_point(plan_file):
    result = subprocess.run(["dask", "obdask", "validate", str(plan_file)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "3 steps" in result.stdout


def test_budgets_from_config_and_from_the_scheduler(cluster_client):
    from obdask.llm.budget import set_budget

    env = {"DASK_OBDASK__LLM__BUDGETS":
           '[{"name": "daily", "scope": "cluster", "tokens": 2000000, "window": "1d"}]'}
    local = obdask("budgets", env=env)
    assert local.returncode == 0 and "daily" in local.stdout and "2000000" in local.stdout
    set_budget(cluster_client, "plan-x", 5000, scope="plan", match="x")
    remote = obdask("budgets", "--scheduler", cluster_client.scheduler.address, "--json")
    assert remote.returncode == 0, remote.stderr
    rows = {r["name"]: r for r in json.loads(remote.stdout)}
    assert rows["plan-x"]["tokens"] == 5000 and rows["plan-x"]["available"] == 5000


def test_runs_and_show_read_the_records(plan_file):
    assert obdask("runs", plan_file).stdout.startswith("no recorded runs")
    assert obdask("show", plan_file).returncode == 2
    run = json.loads(obdask("run", plan_file, "--json", "--workers", "1").stdout)
    listed = json.loads(obdask("runs", plan_file, "--json").stdout)
    assert [s["run_id"] for s in listed] == [run["run_id"]] and listed[0]["ok"] is True
    shown = json.loads(obdask("show", plan_file, run["run_id"], "--json").stdout)
    assert {r["id"]: r["status"] for r in shown} == {j["id"]: j["status"] for j in run["jobs"]}
    table = obdask("show", plan_file)
    assert table.returncode == 0 and "hello" in table.stdout and "done-at-compile" in table.stdout


def test_storage_errors_are_one_line(tmp_path):
    pytest.importorskip("s3fs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    result = subprocess.run([sys.executable, "-m", "obdask.cli", "hash", "s3://no-bucket/x"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: storage: ") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_explain_text_shows_sizes_and_durations_for_people(tmp_path):
    (tmp_path / "p.md").write_text(
        "- [ ] id=a lane=1 resources=GPU:2,VRAM:24GB,CPU:4 retries=2 timeout=90s "
        "payload=@cmd:true\n")
    line = obdask("explain", tmp_path / "p.md").stdout.splitlines()[1]
    assert "resources=GPU:2,VRAM:24GB,CPU:4" in line
    assert "retries=2" in line and "timeout=90s" in line
