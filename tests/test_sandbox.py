"""The bubblewrap sandbox of ``@cmd:`` jobs, tried as an attacker would.

Each probe is a real command run with :func:`obdask.payloads.cmd.run_command`
(the same path a job takes on a worker); where a probe could pass vacuously,
the same command is also run with ``obdask.cmd.sandbox.mode: off`` and must
succeed there.  All traffic stays on loopback.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dask
import psutil
import pytest
from cluster_utils import dask_env, wait_gone

from obdask.exceptions import ConfigError, PayloadError, PlanError, SandboxUnavailable
from obdask.payloads import sandbox
from obdask.payloads.cmd import run_command
from obdask.plan import parse

pytestmark = pytest.mark.skipif(sandbox.unavailable_reason("bwrap") is not None,
                                reason=f"bwrap cannot run here: "
                                       f"{sandbox.unavailable_reason('bwrap')}")

PY = shlex.quote(sys.executable)
ALLOW = ["python", "python3", "echo", "sh", "sleep", "setsid", "head", "touch", "cat", "exit",
         "mkdir", "true", "wait", "ls", "git", "wc"]


def run(command: str, cwd: Path, mode: str = "auto", network: bool = False, **kwargs):
    kwargs.setdefault("timeout", 60)
    with dask.config.set({"obdask.cmd.sandbox.mode": mode,
                          "obdask.cmd.sandbox.network": network}):
        return run_command(command, cwd, allowlist=ALLOW, **kwargs)


def py(code: str) -> str:
    return f"{PY} -c {shlex.quote(code)}"


@pytest.fixture
def ws(tmp_path):
    path = tmp_path / "ws"
    path.mkdir()
    return path


def test_plain_command_runs_with_output_and_exit_code(ws):
    res = run("echo hi; echo err >&2; exit 3", ws)
    assert (res.exit_code, res.stdout, res.stderr) == (3, b"hi\n", b"err\n")
    assert run("true", ws).ok


@pytest.fixture
def tcp_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


def test_no_tcp_to_loopback_unless_network_enabled(ws, tcp_server):
    probe = py(f"import socket; socket.create_connection(('127.0.0.1', {tcp_server}), "
               "timeout=3); print('CONNECTED')")
    res = run(probe, ws)
    assert res.exit_code != 0 and b"CONNECTED" not in res.stdout, res
    assert b"CONNECTED" in run(probe, ws, mode="off").stdout  # the probe itself works
    assert b"CONNECTED" in run(probe, ws, network=True).stdout


@pytest.mark.parametrize("where", ["run", "tmp", "abstract"])
def test_no_unix_socket_of_the_host(ws, tmp_path, where):
    if where == "run":
        if not os.access("/run", os.W_OK):
            pytest.skip("/run is not writable here")
        path = f"/run/obdask-test-{uuid.uuid4().hex[:8]}.sock"
    elif where == "tmp":
        path = str(tmp_path / "host.sock")
    else:
        path = f"\0obdask-test-{uuid.uuid4().hex[:8]}"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    try:
        probe = py(f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); "
                   "print('CONNECTED')")
        res = run(probe, ws)
        assert res.exit_code != 0 and b"CONNECTED" not in res.stdout, res
        assert b"CONNECTED" in run(probe, ws, mode="off").stdout
    finally:
        srv.close()
        if not path.startswith("\0"):
            os.unlink(path)


def test_writes_only_inside_the_workspace(ws, tmp_path):
    outside = tmp_path / "outside.txt"
    repo_probe = Path(__file__).resolve().parents[1] / f"probe-{uuid.uuid4().hex[:8]}"
    etc_probe = Path(f"/etc/obdask-probe-{uuid.uuid4().hex[:8]}")
    host_tmp = Path(f"/tmp/obdask-probe-{uuid.uuid4().hex[:8]}")
    try:
        for target in (outside, repo_probe, etc_probe, Path(sys.prefix) / "probe"):
            res = run(f"echo x > {shlex.quote(str(target))}", ws)
            # under the private /tmp a write "works" but lands in the job's own tmpfs
            assert res.exit_code != 0 or str(target).startswith("/tmp/"), (target, res)
            assert not target.exists(), target
        res = run(f"echo in > inside.txt && mkdir -p d/e && echo x > d/e/f && "
                  f"echo t > {host_tmp} && cat {host_tmp}", ws)
        assert res.ok and res.stdout == b"t\n", res
        assert (ws / "inside.txt").read_text() == "in\n" and (ws / "d/e/f").exists()
        assert not host_tmp.exists()  # the job's /tmp is its own
        assert run(f"echo x > {shlex.quote(str(outside))}", ws, mode="off").ok
    finally:
        for path in (outside, repo_probe, etc_probe, host_tmp):
            if path.exists():
                path.unlink()


def test_system_is_readable_but_root_cannot_remount(ws):
    res = run("cat /etc/hostname >/dev/null && " + py(
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        "sys.exit(0 if libc.mount(b'none', b'/usr', None, 32 | 4096, None) == 0 else 7)"), ws)
    assert res.exit_code == 7, res  # MS_REMOUNT|MS_BIND refused: no capabilities


@pytest.mark.parametrize("launcher", ["spawn", "exec", "preexec"])
def test_cannot_see_other_processes_or_the_worker_environ(ws, launcher):
    other = subprocess.Popen(["sleep", "60"])
    try:
        probe = py(
            "import os, sys\n"
            f"seen = [os.path.exists('/proc/{other.pid}'), os.path.exists('/proc/{os.getpid()}')]\n"
            "try:\n"
            f"    open('/proc/{os.getpid()}/environ').read(); seen.append(True)\n"
            "except OSError:\n"
            "    seen.append(False)\n"
            "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "print(seen, len(pids))\n")
        with dask.config.set({"obdask.cmd.launcher": launcher}):
            res = run(probe, ws)
            assert res.ok, res
            seen, count = res.stdout.decode().rsplit(" ", 1)
            assert seen == "[False, False, False]" and int(count) <= 4, res.stdout
            control = run(probe, ws, mode="off")
        assert control.stdout.startswith(b"[True, True, True]"), control
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("launcher", ["spawn", "exec", "preexec"])
def test_rlimits_still_apply_inside(ws, launcher):
    with dask.config.set({"obdask.cmd.launcher": launcher}):
        res = run("head -c 3000000 /dev/zero > big", ws, limits={"file-size": "1MiB"})
    assert res.exit_code != 0, res
    assert (ws / "big").stat().st_size <= 1 << 20


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_timeout_leaves_no_process_even_setsid(ws):
    marker = f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    line = (f"sleep {marker} & setsid sleep {marker} & "
            + py(f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', "
                 f"['sleep', '{marker}'])\ntime.sleep(1)") + f" & sleep {marker}")
    start = time.monotonic()
    res = run(line, ws, timeout=2)
    assert res.timed_out and time.monotonic() - start < 30
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _marked(marker)
    for proc in left:
        proc.kill()
    assert not left, [p.info["cmdline"] for p in left]
    assert wait_gone(res.pid)


def test_mode_require_refuses_without_bwrap(ws):
    with dask.config.set({"obdask.cmd.sandbox.bwrap": "/nonexistent/bwrap"}):
        with pytest.raises(SandboxUnavailable, match="bubblewrap") as info:
            run("true", ws, mode="require")
    assert "mode: auto" in str(info.value)


def test_mode_auto_without_bwrap_warns_once_and_runs_unsandboxed(ws, caplog):
    missing = f"/nonexistent/bwrap-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="obdask.payloads.sandbox"), \
            dask.config.set({"obdask.cmd.sandbox.bwrap": missing}):
        for _ in range(3):
            res = run(py(f"import os; print(os.path.exists('/proc/{os.getpid()}'))"), ws)
            assert res.stdout == b"True\n"
    warnings = [r for r in caplog.records if "sandbox" in r.getMessage()]
    assert len(warnings) == 1 and "rlimit" in warnings[0].getMessage()


def test_bad_mode_is_a_config_error(ws):
    with pytest.raises(ConfigError, match="auto, require, off"):
        run("true", ws, mode="sometimes")


def test_string_shorthand_for_mode(ws):
    with dask.config.set({"obdask.cmd.sandbox": "off"}):
        res = run_command(py(f"import os; print(os.path.exists('/proc/{os.getpid()}'))"), ws,
                          allowlist=ALLOW)
    assert res.stdout == b"True\n"


def test_argv_is_one_bwrap_exec_no_shell_layer(ws):
    argv = sandbox.wrap(["/bin/sh", "-c", "true"], ws, {"PATH": "/usr/bin"})
    assert argv is not None and os.path.basename(argv[0]) == "bwrap"
    assert argv[-3:] == ["/bin/sh", "-c", "true"] and argv[-4] == "--"
    joined = " ".join(argv)
    for flag in ("--unshare-net", "--unshare-pid", "--die-with-parent", "--new-session",
                 "--cap-drop ALL", f"--bind {ws} {ws}", "--tmpfs /tmp", "--proc /proc"):
        assert flag in joined, flag
    assert " /run " not in f" {joined} "


@pytest.mark.slow
def test_obdask_run_jobs_are_sandboxed(tmp_path):
    probe = Path(f"/etc/obdask-probe-{uuid.uuid4().hex[:8]}")
    plan = tmp_path / "p.md"
    plan.write_text("# Plan: box\n"
                    "- [ ] id=ok lane=1 payload=@cmd:echo hi > hi.txt\n"
                    f"- [ ] id=bad lane=1 deps=ok payload=@cmd:touch {probe}\n")
    try:
        done = subprocess.run([sys.executable, "-m", "obdask.cli", "run", str(plan), "--json",
                               "--workers", "1"], capture_output=True, text=True, timeout=240,
                              env=dask_env())
        statuses = {j["id"]: j["status"] for j in json.loads(done.stdout)["jobs"]}
        assert statuses["ok"] == "done" and statuses["bad"] != "done", done.stdout
        assert (tmp_path / "hi.txt").read_text() == "hi\n"
        assert not probe.exists()
    finally:
        if probe.exists():
            probe.unlink()


@pytest.mark.parametrize("workspace", ["/", "/etc", "/usr/lib"])
def test_workspace_over_a_system_path_is_refused(workspace):
    with pytest.raises(PayloadError, match="overlaps the read-only system path"):
        run("true", Path(workspace))


def test_probe_reports_why_bwrap_cannot_run():
    assert "not found" in sandbox.unavailable_reason("/nonexistent/bwrap")
    assert sandbox.unavailable_reason() is None  # it works here (skip marker above)


@pytest.mark.parametrize("launcher", ["spawn", "exec", "preexec"])
def test_job_dies_with_its_worker(ws, launcher):
    """SIGKILL of the worker leaves nothing of the sandboxed job, setsid children included."""
    marker = f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    script = (
        "import dask, sys\n"
        "from obdask.payloads.cmd import run_command\n"
        f"dask.config.set({{'obdask.cmd.launcher': {launcher!r}}})\n"
        f"run_command('setsid sleep {marker} & sleep {marker} & echo up > up; wait', "
        f"sys.argv[1], timeout=120, allowlist={ALLOW!r})\n")
    worker = subprocess.Popen([sys.executable, "-c", script, str(ws)], env=dask_env())
    try:
        deadline = time.monotonic() + 30
        while len(_marked(marker)) < 2 or not (ws / "up").exists():
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.05)
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _marked(marker)
    for proc in left:
        proc.kill()
    assert not left


# ------------------------------------------------------------ #apply confinement


def _diff(old: str, new: str, body: str = "@@ -0,0 +1 @@\n+pwned\n") -> bytes:
    return f"--- {old}\n+++ {new}\n{body}".encode()


@pytest.fixture
def apply_ws(tmp_path):
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "app.py").write_text("x = 1\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret\n")
    (ws / "link").symlink_to(outside)
    (ws / "flink").symlink_to(outside / "secret")
    return ws


@pytest.mark.parametrize("diff, why", [
    (_diff("a/../outside/new", "b/../outside/new"), "'..'"),
    (_diff("/dev/null", "b/src/../../outside/x"), "'..'"),
    (_diff("/etc/passwd", "/etc/passwd"), "absolute"),
    (_diff("/dev/null", "b/link/new"), "symbolic link"),
    (_diff("a/flink", "b/flink", "@@ -1 +1 @@\n-secret\n+pwned\n"), "symbolic link"),
    (_diff("/dev/null", "b/.git/hooks/pre-commit"), ".git"),
    (_diff("/dev/null", "b/sub/.GIT/config"), ".git"),
    (_diff('"a/\\056\\056/outside/q"', '"b/\\056\\056/outside/q"'), "'..'"),
    (b"diff --git a/src/app.py b/../evil.py\nsimilarity index 100%\n"
     b"rename from src/app.py\nrename to ../evil.py\n", "'..'"),
    (b"diff --git a/ln b/ln\nnew file mode 120000\n--- /dev/null\n+++ b/ln\n"
     b"@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n", "symbolic link"),
])
def test_escaping_diffs_are_refused_before_writing(apply_ws, diff, why):
    before = sorted(p.name for p in apply_ws.parent.rglob("*"))
    with pytest.raises(PayloadError, match="refused") as info:
        sandbox.confine_diff(diff, apply_ws)
    assert why.lower() in str(info.value).lower()
    assert sorted(p.name for p in apply_ws.parent.rglob("*")) == before


def test_confined_diff_lists_its_paths_and_ignores_hunk_lines(apply_ws):
    diff = (b"diff --git a/src/app.py b/src/app.py\n--- a/src/app.py\t2026-01-01 10:00\n"
            b"+++ b/src/app.py\t2026-01-01 10:01\n@@ -1,2 +1,2 @@\n x = 1\n"
            b"--- /etc/passwd looks like a header but is a removed line\n"
            b"+++ /etc/shadow as is this added one\n"
            b"--- /dev/null\n+++ b/new/file.txt\n@@ -0,0 +1 @@\n+hello\n")
    assert sandbox.confine_diff(diff, apply_ws) == ["src/app.py", "new/file.txt"]


@pytest.mark.slow
def test_apply_step_refuses_a_diff_through_a_symlink(apply_ws):
    outside = apply_ws.parent / "outside" / "secret"
    (apply_ws / "evil.diff").write_bytes(
        _diff("a/flink", "b/flink", "@@ -1 +1 @@\n-secret\n+pwned\n"))
    (apply_ws / "ok.diff").write_bytes(_diff("a/src/app.py", "b/src/app.py",
                                             "@@ -1 +1 @@\n-x = 1\n+x = 2\n"))
    plan = apply_ws / "p.md"
    plan.write_text("# Plan: diffs\n- [ ] id=ok lane=1 payload=@file:ok.diff#apply\n"
                    "- [ ] id=evil lane=2 payload=@file:evil.diff#apply\n")
    done = subprocess.run([sys.executable, "-m", "obdask.cli", "run", str(plan), "--json",
                           "--workers", "1"], capture_output=True, text=True, timeout=240,
                          env=dask_env())
    jobs = {j["id"]: j for j in json.loads(done.stdout)["jobs"]}
    assert jobs["ok"]["status"] == "done", jobs
    assert jobs["evil"]["status"] != "done" and "refused" in jobs["evil"]["error"], jobs
    assert outside.read_text() == "secret\n"
    assert (apply_ws / "src" / "app.py").read_text() == "x = 2\n"


def test_home_is_private_and_writable(ws, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".secret").write_text("token\n")
    res = run('echo cache > "$HOME/c" && cat "$HOME/c" && ls -A "$HOME"', ws,
              extra_env={"HOME": str(home)})
    assert res.ok and res.stdout == b"cache\nc\n", res  # the host's files are not there
    assert not (home / "c").exists()


# ------------------------------------------------------------ git workspaces

GIT = "git -c user.name=t -c user.email=t@example.com"


@pytest.fixture
def mirror_and_worktree(tmp_path):
    """A repository and a detached worktree of it, as obdask.workspace.checkout makes."""
    from cluster_utils import git_repository

    mirror = tmp_path / "obdask-git" / "clone"
    sha = git_repository(mirror, "m")
    tree = tmp_path / "obdask-git" / "rev-1"
    subprocess.run(["git", "worktree", "add", "--quiet", "--detach", str(tree), sha],
                   cwd=mirror, check=True, capture_output=True)
    return mirror, tree


def test_git_worktree_workspace_works_inside(mirror_and_worktree):
    mirror, tree = mirror_and_worktree
    res = run(f"git rev-parse HEAD && echo x > new.txt && git add new.txt && "
              f"{GIT} commit -qm new && git log --oneline | wc -l", tree,
              )
    assert res.ok and res.stdout.split()[-1] == b"2", res
    # the commit is real: its objects went to the shared repository
    log = subprocess.run(["git", "log", "--oneline", "-1"], cwd=tree, capture_output=True,
                         text=True, check=True).stdout
    assert "new" in log


def test_git_hooks_and_config_are_out_of_a_jobs_reach(mirror_and_worktree):
    """The worker runs git in these repositories outside the sandbox (worktree add,
    apply): a hook or core.fsmonitor planted by a job would run there."""
    mirror, tree = mirror_and_worktree
    for ws, gitdir in ((tree, mirror / ".git"), (mirror, mirror / ".git")):
        hook = gitdir / "hooks" / "post-checkout"
        res = run(f"echo 'touch /tmp/pwned' > {hook}; {GIT} config core.fsmonitor evil; "
                  "echo done", ws)
        assert res.stdout == b"done\n", res
        assert not hook.exists(), ws
        assert "fsmonitor" not in (gitdir / "config").read_text(), ws
        assert run(f"{GIT} status --short && git rev-parse HEAD", ws).ok


# ------------------------------------------------------------ processes, memory, network
@pytest.mark.parametrize("mode", ["auto", "off"])
def test_setsid_grandchild_does_not_outlive_the_timeout_in_either_mode(ws, mode):
    """Sandbox: the PID namespace; rlimit-only: the job's pids cgroup (where it can be made)."""
    from obdask.payloads import cgroup

    if mode == "off" and cgroup._parent() is None:
        pytest.skip("no writable pids cgroup: rlimit-only mode holds the process group only")
    marker = f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    line = (f"setsid sleep {marker} & "
            + py(f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    "
                 f"os.execvp('sleep', ['sleep', '{marker}'])\ntime.sleep(1)")
            + f" & sleep {marker}")
    res = run(line, ws, mode=mode, timeout=2)
    assert res.timed_out
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _marked(marker)
    for proc in left:
        proc.kill()
    assert not left, [p.info["cmdline"] for p in left]


def test_setsid_survivor_after_exit_is_killed_in_rlimit_only_mode(ws):
    from obdask.payloads import cgroup

    if cgroup._parent() is None:
        pytest.skip("no writable pids cgroup")
    marker = f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    res = run(f"setsid sleep {marker} & echo started", ws, mode="off")
    assert res.ok
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _marked(marker)


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_fork_bomb_is_contained(ws, mode):
    """Root ignores RLIMIT_NPROC: the pids cgroup bounds the bomb, the timeout ends it."""
    from obdask.payloads import cgroup

    if cgroup._parent() is None and (mode == "off" or os.getuid() == 0):
        pytest.skip("no pids cgroup: a fork bomb run as root would not be bounded")
    # the checker refuses function definitions, so the bomb comes as a script file
    (ws / "bomb.sh").write_text(":(){ :|:& };:\n")
    before = len(psutil.pids())
    with dask.config.set({"obdask.cmd.pids-max": 64}):
        res = run("sh bomb.sh", ws, mode=mode, timeout=3)
    assert res.timed_out or res.exit_code != 0, res
    deadline = time.monotonic() + 15
    while len(psutil.pids()) > before + 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(psutil.pids()) <= before + 20, (before, len(psutil.pids()))
    assert run("echo alive", ws).stdout == b"alive\n"  # this process can still fork


def test_a_reused_job_cgroup_takes_the_current_pids_max(ws):
    """Job cgroups are pooled and reused; each job gets the pids-max set when it runs."""
    from obdask.payloads import cgroup

    if cgroup._parent() is None:
        pytest.skip("no writable pids cgroup")

    def limit_of_pooled_group() -> str:
        return (Path(cgroup._pool[-1].path) / "pids.max").read_text().strip()

    for limit in (1024, 7, 7, 1024):
        with dask.config.set({"obdask.cmd.pids-max": limit}):
            assert run("true", ws, mode="off").ok
        assert limit_of_pooled_group() == str(limit)
    with dask.config.set({"obdask.cmd.pids-max": 7}):  # and the limit holds
        res = run(" & ".join(["sleep 1"] * 12) + "; wait", ws, mode="off")
    assert res.exit_code != 0, res


def test_a_pooled_job_cgroup_removed_meanwhile_is_replaced(ws):
    """A pooled cgroup can vanish (a closed watchdog sweeps this process's job cgroups):
    the next job gets a new one, not the vanished one and then none."""
    from obdask.payloads import cgroup

    if cgroup._parent() is None:
        pytest.skip("no writable pids cgroup")
    assert run("true", ws, mode="off").ok
    gone = cgroup._pool[-1]
    os.rmdir(gone.path)  # as the watchdog's sweep does
    script = "cat /proc/self/cgroup"
    res = run(script, ws, mode="off")
    assert res.ok, res
    lines = res.stdout.decode().splitlines()  # v1: "N:pids:/path"; v2: "0::/path"
    here = next((ln for ln in lines if ":pids:" in ln), lines[-1]).rsplit("/", 1)[-1]
    assert here.startswith(f"obdask-{os.getpid()}-") and here != os.path.basename(gone.path)


def test_memory_limit_fails_the_job_clearly_and_the_worker_lives(ws):
    res = run(py("x = bytearray(800 * 1024 * 1024); print('ALLOCATED')"), ws,
              limits={"address-space": "300MiB"})
    assert res.exit_code != 0 and b"ALLOCATED" not in res.stdout, res
    assert b"MemoryError" in res.stderr, res.stderr[-500:]
    assert run("echo alive", ws).ok


def test_network_opt_in_per_step(tmp_path, tcp_server):
    """A step with network=true reaches a loopback TCP server; its neighbour cannot."""
    import obdask

    probe = ("python -c \"import socket; socket.create_connection(('127.0.0.1', "
             f"{tcp_server}), timeout=3); print('CONNECTED')\"")
    plan = tmp_path / "plan.md"
    plan.write_text(f"- [ ] id=open lane=1 network=true payload=@cmd:{probe}\n"
                    f"- [ ] id=closed lane=1 payload=@cmd:{probe}\n")
    with dask.config.set({"obdask.cmd.sandbox.mode": "require"}):
        result = obdask.run(plan, workspace=tmp_path)
    frame = result.frame
    assert frame.loc["open", "status"] == "done", frame.loc["open", "error"]
    assert frame.loc["closed", "status"] == "failed", frame.loc["closed"]
    error = frame.loc["closed", "error"]
    assert "Connection refused" in error or "unreachable" in error, error  # its own netns
    with pytest.raises(PlanError, match="network=true applies to @cmd: steps only"):
        parse("- [ ] id=f lane=1 network=true payload=@file:x.md\n")


def test_a_clean_job_reads_its_cgroup_once(ws, monkeypatch):
    """A job whose shell left nothing behind costs one read of its cgroup's process list
    (at the shell's exit), not one per kill and release: each read is ~50-100 us."""
    from obdask.payloads import cgroup

    if cgroup._parent() is None:
        pytest.skip("no writable pids cgroup")
    assert run("true", ws, mode="off").ok  # the pool holds a group now
    reads: list[str] = []
    original = cgroup.JobGroup.pids

    def counted(self: cgroup.JobGroup) -> list[int]:
        reads.append(self.path)
        return original(self)

    monkeypatch.setattr(cgroup.JobGroup, "pids", counted)
    for _ in range(5):
        assert run("true", ws, mode="off").ok
    assert len(reads) == 5, reads
    # a leftover is still found and killed at the exit (the reads are not skipped then)
    marker = f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    assert run(f"setsid sleep {marker} & echo started", ws, mode="off").ok
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _marked(marker)


def test_a_leftover_that_is_already_exiting_is_waited_for_briefly(ws, monkeypatch):
    """bwrap's outer process exits a moment before its PID namespace's init, which the
    job's cgroup still lists then: the kill loop looks again within a millisecond, not
    after 5 ms (5 of a sandboxed job's 17 ms with the default pids cgroup)."""
    from obdask.payloads import cgroup

    if cgroup._parent() is None:
        pytest.skip("no writable pids cgroup")
    group = cgroup.create()
    assert group is not None
    # a leftover whose parent reaps it at once, as pid 1 reaps the sandbox's init
    holder = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE)
    assert holder.stdout is not None
    leftover = int(holder.stdout.readline())
    real_pids, real_sleep, reads = cgroup.JobGroup.pids, time.sleep, []

    def listed_while_exiting(self: cgroup.JobGroup) -> list[int]:
        reads.append(self.path)
        if len(reads) <= 3:  # the first looks find it still there, as a dying init is
            return [leftover]
        deadline = time.monotonic() + 10
        while real_pids(self) and time.monotonic() < deadline:
            real_sleep(0.01)
        return real_pids(self)

    try:
        group.add(leftover)
        slept: list[float] = []
        monkeypatch.setattr(cgroup.JobGroup, "pids", listed_while_exiting)
        monkeypatch.setattr(cgroup.time, "sleep", slept.append)
        group.kill()
        assert holder.wait(timeout=10) == 0 and not psutil.pid_exists(leftover)  # killed
        # two or three more looks (one fewer with cgroup.kill), under 2 ms in all
        assert len(slept) <= 3 and sum(slept) < 0.002, slept
        assert group.empty
    finally:
        monkeypatch.undo()
        holder.kill()
        holder.wait()
        group.remove()
