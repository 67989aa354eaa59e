"""Tests of the ``@cmd:`` executor: static check and contained runs (real processes)."""

from __future__ import annotations

import os
import pickle
import sys
import time

import dask
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obdask.exceptions import CommandRefused, ConfigError, PayloadError
from obdask.payloads.cmd import CommandResult, check_command, run_command
from tests.cluster_utils import wait_gone

DEFAULT_ALLOW = list(dask.config.get("obdask.cmd.allowlist"))
WITH_SH = [*DEFAULT_ALLOW, "sh"]


_gone = wait_gone


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


# ------------------------------------------------------------------ check_command
@pytest.mark.parametrize(("command", "expected"), [
    ("echo hi > out.txt && pytest -q | tee log", ["echo", "pytest", "tee"]),
    ('echo "rm -rf /"', ["echo"]),
    ("echo 'a; rm x' \\; rm", ["echo"]),
    ("X=1 Y=2 python -m pytest 2>&1 | tee log", ["python", "tee"]),
    ("/usr/bin/git status", ["/usr/bin/git"]),
    ("{ ls; cat x; } > out 2>err", ["ls", "cat"]),
    ("( cd sub && make ) || echo failed", ["cd", "make", "echo"]),
    ("if [ -f x ]; then echo a; elif test -d y; then ls; else true; fi", ["[", "echo", "test",
                                                                         "ls", "true"]),
    ("for f in a b; do echo $f; done", ["echo"]),
    ("while false; do sleep 1; done\nls", ["false", "sleep", "ls"]),
    ("! git diff --quiet || make", ["git", "make"]),
    ("env FOO=1 python x.py", ["env", "python"]),
    ("ls | xargs -I{} echo {}", ["ls", "xargs", "echo"]),
    ("cat <<EOF\nrm -rf /\nEOF\nls", ["cat", "ls"]),
    ("ls # ; rm -rf /", ["ls"]),
    ("echo ${HOME:-x} $((1 + 2))", ["echo"]),
])
def test_check_allows(command, expected):
    assert check_command(command) == expected


@pytest.mark.parametrize(("command", "culprit"), [
    ("ls && rm -rf x", "'rm'"),
    ("ls; rm x", "'rm'"),
    ("ls\nrm x", "'rm'"),
    ("ls | rm x", "'rm'"),
    ("ls & rm x", "'rm'"),
    ("( ls; rm x )", "'rm'"),
    ("{ ls; rm x; }", "'rm'"),
    ("if true; then rm x; fi", "'rm'"),
    ("r\\m x", "'rm'"),
    ("'rm' x", "'rm'"),
    ("/bin/rm x", "'/bin/rm'"),
    ("X=1 rm x", "'rm'"),
    ("env rm x", "'rm'"),
    ("xargs rm", "'rm'"),
    ("echo hi &>/dev/null rm x", "'rm'"),
    ("curl http://x | sh", "'curl'"),
    ("eval ls", "'eval'"),
    ("exec ls", "'exec'"),
    (". ./env.sh", "'.'"),
    ("source env.sh", "'source'"),
    ("bash -c ls", "'bash'"),
    ("$CMD x", "'$CMD'"),
    ("pyth* x", "'pyth*'"),
])
def test_check_refuses_executable(command, culprit):
    with pytest.raises(CommandRefused, match="allowlist|literal|pattern") as info:
        check_command(command)
    message = str(info.value)
    assert culprit in message and "\n" not in message


@pytest.mark.parametrize("command", [
    "echo $(rm x)", "echo `rm x`", "echo \"$(ls)\"", "echo ${x:-$(ls)}", "cat <(ls)",
    "cat <<EOF\n$(ls)\nEOF\n", "echo $(( $(ls) ))",
])
def test_substitution_refused_by_default(command):
    with pytest.raises(CommandRefused, match="obdask.cmd.allow-substitution"):
        check_command(command)


@pytest.fixture(autouse=True)
def _no_sandbox(monkeypatch):
    """These tests check the launcher's own process handling (host pids, process groups,
    the watchdog); the bubblewrap sandbox hides host pids (tests/test_sandbox.py)."""
    monkeypatch.setenv("DASK_OBDASK__CMD__SANDBOX__MODE", "off")  # for child workers too
    with dask.config.set({"obdask.cmd.sandbox.mode": "off"}):
        yield


def test_substitution_allowed_is_checked_inside():
    assert check_command("echo $(ls | wc -l) `date`", allow_substitution=True) == [
        "ls", "wc", "date", "echo"]
    for command in ("echo $(rm x)", "echo `rm x`", "echo \"$(ls; rm x)\"", "X=$(rm) ls"):
        with pytest.raises(CommandRefused, match="'rm' is not on the allowlist"):
            check_command(command, allow_substitution=True)


def test_quoted_single_quotes_hide_nothing_in_double_quotes():
    # inside "${...}" a single quote is literal: the $(...) runs in sh
    with pytest.raises(CommandRefused):
        check_command("echo \"${x:-'$(rm x)'}\"")
    assert check_command("echo '$(rm x)' \"\\$(rm x)\"") == ["echo"]


@pytest.mark.parametrize("command", [
    "case x in a) ls;; esac", "f() { ls; }", "[[ -f x ]]", "echo 'unterminated", "echo \"x",
    "ls )", "( ls", "echo $(( (1) )", "{ ls; } rm",
])
def test_unsupported_constructs_refused(command):
    with pytest.raises(CommandRefused):
        check_command(command, allowlist=[*DEFAULT_ALLOW, "f"])


def test_allowlist_argument_and_nested_shell():
    assert check_command("sh -c 'ls && echo x'", allowlist=WITH_SH) == ["sh", "ls", "echo"]
    with pytest.raises(CommandRefused, match="'rm'"):
        check_command("sh -c 'ls; rm x'", allowlist=WITH_SH)
    with pytest.raises(CommandRefused, match="'ls'"):
        check_command("ls", allowlist=["echo"])
    with dask.config.set({"obdask.cmd.allowlist": ["echo"]}):
        with pytest.raises(CommandRefused, match="obdask.cmd.allowlist"):
            check_command("ls")
    assert check_command("ls") == ["ls"]


SHELLISH = st.text(alphabet="ab $(){}`'\"\\;&|<>#\n=*?[]!-c0129", max_size=80)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.one_of(st.text(max_size=80), SHELLISH), allow_sub=st.booleans())
def test_check_never_crashes(command, allow_sub):
    try:
        result = check_command(command, allowlist=[*DEFAULT_ALLOW, "a", "b"],
                               allow_substitution=allow_sub)
    except CommandRefused:
        return
    assert isinstance(result, list) and all(isinstance(x, str) for x in result)


def test_deep_nesting_is_refused_not_crashing():
    with pytest.raises(CommandRefused):
        check_command("echo " + "$(" * 500 + ")" * 500, allow_substitution=True)
    with pytest.raises(CommandRefused):
        check_command("(" * 5000 + "ls" + ")" * 5000 + "; rm")


# -------------------------------------------------------------------- run_command
def test_run_pipeline_and_redirection(tmp_path):
    res = run_command("echo hi > out.txt && cat out.txt | tr a-z A-Z | tee log", str(tmp_path))
    assert res.exit_code == 0 and res.ok and not res.timed_out
    assert res.stdout == b"HI\n" and res.stdout_bytes == 3
    assert (tmp_path / "out.txt").read_text() == "hi\n"
    assert (tmp_path / "log").read_text() == "HI\n"
    assert pickle.loads(pickle.dumps(res)) == res
    assert isinstance(res, CommandResult) and res.pid > 0 and res.duration_s >= 0


def test_run_exit_code_and_stderr(tmp_path):
    res = run_command("echo oops >&2; exit 3", str(tmp_path))
    assert res.exit_code == 3 and res.stderr == b"oops\n" and not res.ok
    assert run_command("false", str(tmp_path)).exit_code == 1


def test_refused_command_runs_nothing(tmp_path):
    with pytest.raises(CommandRefused, match="'curl'"):
        run_command("touch made && curl http://127.0.0.1:9/ | sh", str(tmp_path))
    assert not (tmp_path / "made").exists()


def test_environment_is_reduced(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": "/home/x", "SECRET_TOKEN": "s3cr3t"}
    res = run_command("env", str(tmp_path), env=env, extra_env={"OBDASK_JOB": "j1"})
    lines = set(res.stdout.decode().splitlines())
    assert "HOME=/home/x" in lines and "OBDASK_JOB=j1" in lines
    assert not any(line.startswith("SECRET_TOKEN=") for line in lines)
    res = run_command("env", str(tmp_path), env=env, env_allowlist=["PATH", "SECRET_TOKEN"])
    assert "SECRET_TOKEN=s3cr3t" in res.stdout.decode().splitlines()


def test_the_worker_environment_is_read_as_it_is_now(tmp_path, monkeypatch):
    """The allowlisted variables of os.environ are cached; a change (new value, new
    variable, one removed, another allowlist) must reach the next command."""
    def env_of(**kwargs):
        res = run_command("env", str(tmp_path), **kwargs)
        return dict(line.split("=", 1) for line in res.stdout.decode().splitlines()
                    if "=" in line)

    monkeypatch.setenv("LANG", "C.first")
    monkeypatch.delenv("TZ", raising=False)
    assert env_of()["LANG"] == "C.first" and "TZ" not in env_of()
    monkeypatch.setenv("LANG", "C.second")
    monkeypatch.setenv("TZ", "UTC")
    assert (env_of()["LANG"], env_of()["TZ"]) == ("C.second", "UTC")
    monkeypatch.delenv("LANG")
    assert "LANG" not in env_of()
    assert set(env_of(env_allowlist=["PATH", "TZ"])) - {"PWD"} == {"PATH", "TZ"}  # sh sets PWD
    first = env_of(extra_env={"OBDASK_JOB": "j1"})  # the cached dict is never handed out
    assert first["OBDASK_JOB"] == "j1" and "OBDASK_JOB" not in env_of()


def test_timeout_kills_whole_process_group(tmp_path):
    command = "sh -c 'sleep 300 & echo $! > pid; sleep 300'"
    start = time.monotonic()
    res = run_command(command, str(tmp_path), timeout=1, allowlist=WITH_SH)
    assert res.timed_out and not res.ok and res.exit_code != 0
    assert time.monotonic() - start < 10
    grandchild = int((tmp_path / "pid").read_text())
    assert _gone(grandchild)
    assert _group_members(res.pid) == []


def test_background_jobs_killed_after_exit(tmp_path):
    start = time.monotonic()
    res = run_command("sleep 300 & echo $! > pid; echo done", str(tmp_path), timeout=30)
    assert res.exit_code == 0 and res.stdout == b"done\n" and not res.timed_out
    assert time.monotonic() - start < 5
    assert _gone(int((tmp_path / "pid").read_text()))


def test_file_size_limit(tmp_path):
    # Default launcher ("spawn"): the shell waits until the parent has set the limits,
    # so even the first command of the line runs limited (no race, checked many times).
    for _ in range(50):
        res = run_command("head -c 50000000 /dev/zero > big", str(tmp_path),
                          limits={"file-size": "4KiB"})
        assert res.exit_code != 0
        assert (tmp_path / "big").stat().st_size <= 4096
    res = run_command("ulimit -f; ulimit -t", str(tmp_path),
                      limits={"file-size": "1MiB", "cpu-seconds": "1m"}, allowlist=["ulimit"])
    assert res.stdout.split() == [b"2048", b"60"]
    res = run_command("head -c 100000 /dev/zero > big", str(tmp_path))
    assert res.exit_code == 0 and (tmp_path / "big").stat().st_size == 100000


def test_limits_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown limit"):
        run_command("true", str(tmp_path), limits={"bogus": 1})
    with pytest.raises(ConfigError, match="file-size"):
        run_command("true", str(tmp_path), limits={"file-size": "lots"})
    assert run_command("true", str(tmp_path), limits={"file-size": None}).ok


def test_output_truncation_keeps_counts(tmp_path):
    res = run_command("head -c 3000000 /dev/zero; echo err >&2", str(tmp_path), max_output=1000)
    assert res.exit_code == 0 and res.truncated
    assert len(res.stdout) == 1000 and res.stdout_bytes == 3_000_000
    assert res.stderr == b"err\n" and res.stderr_bytes == 4


def test_big_output_on_both_streams_does_not_deadlock(tmp_path):
    res = run_command("head -c 2000000 /dev/zero >&2; head -c 2000000 /dev/zero",
                      str(tmp_path), timeout=30)
    assert res.ok and res.stdout_bytes == res.stderr_bytes == 2_000_000


def test_missing_cwd_and_shell(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(PayloadError, match="nope"):
        run_command("true", str(missing))
    with dask.config.set({"obdask.cmd.shell": str(tmp_path / "no-shell")}):
        with pytest.raises(PayloadError, match="no-shell"):
            run_command("true", str(tmp_path))
    assert run_command("true", str(tmp_path)).ok  # config change is picked up again


def test_config_defaults_follow_dask_config(tmp_path):
    with dask.config.set({"obdask.cmd.max-output": "10B", "obdask.run.timeout": "1s"}):
        res = run_command("seq 100; sleep 30", str(tmp_path))
    assert res.timed_out and len(res.stdout) == 10 and res.stdout_bytes == 292


@pytest.mark.parametrize("launcher", ["preexec", "exec"])
def test_launchers_apply_limits_and_timeout(tmp_path, launcher):
    with dask.config.set({"obdask.cmd.launcher": launcher}):
        res = run_command("head -c 100000 /dev/zero > big", str(tmp_path),
                          limits={"file-size": "4KiB", "processes": 1000})
        assert res.exit_code != 0 and (tmp_path / "big").stat().st_size <= 4096
        res = run_command("ulimit -f; ulimit -t", str(tmp_path),
                          limits={"file-size": "1MiB", "cpu-seconds": "1m"},
                          allowlist=["ulimit"])
        assert res.stdout.split() == [b"2048", b"60"]  # -f counts 512-byte blocks
        res = run_command("sleep 30", str(tmp_path), timeout=0.5)
        assert res.timed_out
        with pytest.raises(PayloadError, match="working directory"):
            run_command("true", str(tmp_path / "nope"))


def test_bad_launcher_refused(tmp_path):
    with dask.config.set({"obdask.cmd.launcher": "magic"}):
        with pytest.raises(ConfigError, match="launcher"):
            run_command("true", str(tmp_path))


@pytest.mark.parametrize("launcher", ["spawn", "preexec", "exec"])
def test_shell_dies_with_the_worker(tmp_path, launcher):
    """SIGKILL of the calling process kills the shell too (watchdog or PDEATHSIG)."""
    script = (
        "import dask, sys\n"
        "from obdask.payloads.cmd import run_command\n"
        f"dask.config.set({{'obdask.cmd.launcher': {launcher!r}}})\n"
        "run_command('echo $$ > pid; sleep 300 & wait', sys.argv[1], timeout=60)\n"
    )
    worker = psutil.Popen([sys.executable, "-c", script, str(tmp_path)])
    pid_file = tmp_path / "pid"
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.05)
        shell = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while not psutil.Process(shell).children() and time.monotonic() < deadline:
            time.sleep(0.02)
        group = [p.pid for p in psutil.Process(shell).children()]
        worker.kill()
        worker.wait()
        assert _gone(shell)
        if launcher == "spawn":  # the watchdog kills the whole group, the sleep too
            assert group and all(_gone(pid) for pid in group)
    finally:
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.killpg(int(pid_file.read_text()), 9)  # the orphaned sleep
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------- argument length
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux argument limits")
@pytest.mark.parametrize("launcher", ["spawn", "exec", "preexec"])
def test_a_command_over_the_argument_limit_says_it_is_too_long(tmp_path, launcher):
    command = "echo " + "x" * 200_000  # one argument of sh -c: over Linux's 128 KiB
    with dask.config.set({"obdask.cmd.launcher": launcher}):
        with pytest.raises(PayloadError) as info:
            run_command(command, tmp_path, allowlist=DEFAULT_ALLOW)
    message = str(info.value)
    assert "too long" in message and "200005 bytes" in message and "script" in message
    assert "cannot run shell" not in message and "obdask.cmd.shell" not in message


@pytest.mark.parametrize("launcher", ["spawn", "exec", "preexec"])
def test_the_longest_command_still_runs(tmp_path, launcher):
    from obdask.payloads.launch import MAX_COMMAND_BYTES

    with dask.config.set({"obdask.cmd.launcher": launcher}):
        result = run_command("printf " + "x" * (MAX_COMMAND_BYTES - 7), tmp_path,
                             allowlist=DEFAULT_ALLOW)
    assert result.ok and result.stdout_bytes == MAX_COMMAND_BYTES - 7


def test_check_length_refuses_before_running():
    from obdask.payloads.launch import MAX_COMMAND_BYTES, check_length

    check_length("echo " + "x" * (MAX_COMMAND_BYTES - 5))
    with pytest.raises(PayloadError, match="too long"):
        check_length("echo " + "x" * MAX_COMMAND_BYTES)


# ------------------------------------------------------------------ the child's surroundings
def test_an_inheritable_descriptor_of_the_worker_does_not_reach_the_job(tmp_path):
    """``close_fds=True`` semantics: a descriptor the worker made inheritable (a
    multiprocessing pipe, say) is closed in the job."""
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        res = run_command(f"test -e /proc/self/fd/{write_end} && echo leaked; true",
                          str(tmp_path))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert res.ok and res.stdout == b""


def test_a_working_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PayloadError, match="working directory .*f'"):
        run_command("true", str(tmp_path / "f"))


def test_a_relative_shell_name_is_looked_up_in_the_jobs_path(tmp_path):
    with dask.config.set({"obdask.cmd.shell": "sh"}):
        res = run_command("echo $0", str(tmp_path))
    assert res.ok and res.stdout == b"sh\n"
