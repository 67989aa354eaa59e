"""Starting, watching and reaping the shell of an ``@cmd:`` payload.

:func:`spawn` starts ``shell -c command`` in a new session with the
``obdask.cmd.limits`` rlimits in place before any part of the command runs,
using one of three launchers (``obdask.cmd.launcher``):

* ``spawn`` (default): vfork/exec with no Python in the child; the shell waits
  on a builtin ``read`` of its stdin pipe while the parent sets the limits with
  ``prlimit(2)``; a watchdog process (:mod:`obdask.payloads.reaper`) kills the
  process group if the worker dies;
* ``exec``: util-linux ``setpriv --pdeathsig KILL`` and ``prlimit`` exec'd in
  front of the shell;
* ``preexec``: a ``preexec_fn`` (forces ``fork`` of the worker: slowest).

:func:`collect` reads bounded stdout/stderr until the shell exits or its wall
timeout kills the group; :func:`reap` kills what is left of the group.
Policy (what may run, which limits) lives in :mod:`obdask.payloads.cmd`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from typing import Any

from obdask.exceptions import PayloadError
from obdask.payloads import cgroup, sandbox
from obdask.payloads.reaper import watchdog

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

__all__ = ["LAUNCHERS", "LIMIT_KEYS", "MAX_COMMAND_BYTES", "check_length", "collect", "reap",
           "spawn"]

logger = logging.getLogger(__name__)

_TERM_GRACE = 2.0    # seconds between SIGTERM and SIGKILL of a timed-out process group
_DRAIN = 1.0         # seconds to wait for pipes to close once the shell has exited
_POLL = 0.05         # exit-poll interval when pidfd_open is unavailable
_CHUNK = 1 << 16
_PR_SET_PDEATHSIG = 1
LIMIT_KEYS = {  # obdask.cmd.limits key -> (resource name, parser, prlimit option)
    "cpu-seconds": ("RLIMIT_CPU", "seconds", "--cpu"),
    "address-space": ("RLIMIT_AS", "bytes", "--as"),
    "file-size": ("RLIMIT_FSIZE", "bytes", "--fsize"),
    "processes": ("RLIMIT_NPROC", "count", "--nproc"),
}
LAUNCHERS = ("spawn", "exec", "preexec")
_PRLIMIT_OPTS = {getattr(resource, r): opt for r, _, opt in LIMIT_KEYS.values()
                 if resource is not None and hasattr(resource, r)}


def _max_arg_bytes() -> int:
    """Longest single argument ``execve`` takes: Linux's MAX_ARG_STRLEN (32 pages)."""
    try:
        if sys.platform.startswith("linux"):
            return 32 * os.sysconf("SC_PAGE_SIZE")
        return int(os.sysconf("SC_ARG_MAX")) // 2  # elsewhere only the total is limited
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 131072


def check_length(command: str) -> None:
    """Raise :class:`PayloadError` if ``command`` is too long to pass to a shell.

    Raises
    ------
    PayloadError
        The command is more than :data:`MAX_COMMAND_BYTES` bytes in UTF-8.
    """
    size = len(command.encode("utf-8", errors="surrogateescape"))
    if size > MAX_COMMAND_BYTES:
        raise PayloadError(f"@cmd: the command is too long: {size} bytes, more than the "
                           f"{MAX_COMMAND_BYTES} bytes the system passes to a shell in one "
                           "argument; put the commands in a script file and run that")


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


_prctl = _load_prctl()


def spawn(shell: str, command: str, cwd: str | os.PathLike[str], env: dict[str, str],
           rlimits: tuple[tuple[int, int, int], ...], pdeathsig: bool,
           launcher: str, network: bool = False) -> subprocess.Popen[bytes]:
    """Popen ``shell -c command`` in its own session, limits and PDEATHSIG applied.

    ``launcher="spawn"`` (default) registers the process group with this
    process's watchdog (:mod:`obdask.payloads.reaper`), which SIGKILLs it if
    this process dies, and sets the rlimits from the parent with
    ``prlimit(2)`` while the shell blocks on a builtin ``read`` of its stdin
    pipe (:data:`_GATE`), so the command never runs unlimited; no Python runs
    in the child, vfork speed (about 0.5 ms).
    ``launcher="preexec"`` applies them in a ``preexec_fn``, which makes
    subprocess fork instead of vfork: about 2 ms per call for a small worker,
    more for a big one.  ``"exec"`` execs util-linux ``setpriv --pdeathsig KILL``
    and ``prlimit`` in front of the shell instead (vfork, same pid and process
    group; falls back to preexec when they are missing).  With all limits null
    and ``obdask.cmd.pdeathsig: false`` no Python code runs in the child.
    """
    check_length(command)
    argv = [shell, "-c", command]
    preexec = None
    late_limits: tuple[tuple[int, int, int], ...] = ()
    gate: tuple[int, int] | None = None
    box_fds: tuple[int, int, int, int] | None = None  # block r/w, info r/w
    # obdask.payloads.sandbox: one bwrap exec, or None
    box = sandbox.wrap(argv, cwd, env, network=network)
    # a pids cgroup holds setsid'd descendants and bounds fork bombs (root ignores
    # RLIMIT_NPROC); the child joins it while held, so only the spawn launcher uses one
    group = cgroup.create() if launcher == "spawn" else None
    if box is not None and _which(shell) is None:  # bwrap would report it as exit status 1
        raise PayloadError(f"@cmd: cannot run shell {shell!r} (not found); "
                           "set obdask.cmd.shell to an existing shell")
    if launcher == "spawn":
        # Kill-on-worker-death comes from the watchdog (obdask.payloads.reaper);
        # rlimits are set from here with prlimit(2): nothing runs in the child.
        if rlimits and not hasattr(resource, "prlimit"):
            preexec = _make_preexec(rlimits, False)
        elif (rlimits or group) and box is not None:
            # bwrap's child reports its pid on --info-fd and waits on --block-fd: the
            # limits go on it there, before it forks the shell (which inherits them)
            late_limits = rlimits
            block, info = os.pipe(), os.pipe()
            box_fds = (block[0], block[1], info[0], info[1])
            box[-4:-4] = ["--block-fd", str(block[0]), "--info-fd", str(info[1])]
        elif rlimits or group:
            # The shell waits on a pipe until the limits are in place, so no part of the
            # command runs unlimited; EOF (this process died first) makes it exit instead.
            late_limits = rlimits
            gate = os.pipe()
            argv[2] = _GATE + command
    if box is not None:
        argv = box  # [bwrap, ..., "--", shell, "-c", command]
    if launcher != "spawn" and (rlimits or (pdeathsig and _prctl is not None)):
        prefix = _exec_prefix(shell, rlimits, pdeathsig) if launcher == "exec" else None
        if prefix is None:
            preexec = _make_preexec(rlimits, pdeathsig)
        else:
            argv[:0] = prefix
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=gate[0] if gate else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=preexec, close_fds=True,
            pass_fds=(box_fds[0], box_fds[3]) if box_fds else (),
        )
    except OSError as exc:
        _close_gate(gate)
        _close_fds(box_fds)
        if group is not None:
            group.remove()
        if exc.filename is not None and os.fspath(exc.filename) == os.fspath(cwd):
            what = "does not exist" if exc.errno == errno.ENOENT else f"is unusable ({exc})"
            raise PayloadError(f"@cmd: working directory {os.fspath(cwd)!r} {what}") from exc
        if exc.errno == errno.E2BIG:  # the command fits; with the environment it does not
            size = len(command.encode("utf-8", errors="surrogateescape"))
            raise PayloadError(f"@cmd: the command ({size} bytes) and its environment are too "
                               "long for the system (E2BIG); shorten the command (a script "
                               "file) or obdask.cmd.env-allowlist") from exc
        raise PayloadError(f"@cmd: cannot run shell {shell!r} ({exc.strerror or exc}); "
                           "set obdask.cmd.shell to an existing shell") from exc
    except subprocess.SubprocessError as exc:
        _close_gate(gate)
        _close_fds(box_fds)
        if group is not None:
            group.remove()
        raise PayloadError(f"@cmd: could not set up the child process ({exc}); "
                           "check obdask.cmd.limits") from exc
    proc.obdask_cgroup = group  # type: ignore[attr-defined]
    watch = launcher == "spawn" and pdeathsig
    if watch and gate is None:
        _watch(proc)
    if gate is not None:
        os.close(gate[0])
        _open_gate(proc, late_limits, gate[1], watch)
    if box_fds is not None:
        _open_box(proc, late_limits, box_fds)
    return proc


def _open_box(proc: subprocess.Popen[bytes], rlimits: tuple[tuple[int, int, int], ...],
              fds: tuple[int, int, int, int]) -> None:
    """Set ``rlimits`` on bwrap's waiting child (pid from ``--info-fd``), then release it."""
    os.close(fds[0])
    os.close(fds[3])
    try:
        info = b""
        while b"}" not in info:  # {"child-pid": N, ...}; EOF: bwrap failed (see stderr)
            chunk = os.read(fds[2], 4096)
            if not chunk:
                break
            info += chunk
        if b"}" in info:
            child = int(info.split(b'"child-pid":', 1)[1].split(b",", 1)[0].split(b"}")[0])
            for rid, soft, hard in rlimits:
                resource.prlimit(child, rid, (soft, hard))
            _join_cgroup(proc, child)
        try:
            os.write(fds[1], b"x")
        except BrokenPipeError:
            pass  # bwrap already exited; its stderr says why
    except (OSError, ValueError, IndexError) as exc:
        _killpg(proc.pid, signal.SIGKILL)  # the child waits on --block-fd: nothing ran
        reap(proc)
        raise PayloadError(f"@cmd: could not apply obdask.cmd.limits inside the sandbox "
                           f"({exc}); check the limits, or set obdask.cmd.launcher: "
                           "preexec") from exc
    finally:
        os.close(fds[1])
        os.close(fds[2])


def _close_fds(fds: tuple[int, ...] | None) -> None:
    for fd in fds or ():
        os.close(fd)


# Prepended to the command under the "spawn" launcher: a builtin read (no fork) of the
# shell's stdin (a pipe) blocks it until the parent has set the rlimits; the command
# then gets /dev/null as stdin, as under the other launchers.
_GATE = "read -r _ || exit 125; exec </dev/null\n"
#: Longest command (UTF-8 bytes) that fits in the one argument of ``sh -c COMMAND``, with
#: the spawn launcher's gate prepended and the terminating NUL.
MAX_COMMAND_BYTES = _max_arg_bytes() - len(_GATE) - 1


def _watch(proc: subprocess.Popen[bytes]) -> None:
    """Register the job's process group with the watchdog (killed if this process dies)."""
    proc.obdask_watched = watchdog.watch(proc.pid)  # type: ignore[attr-defined]
    if not proc.obdask_watched:  # type: ignore[attr-defined]
        logger.warning("@cmd: pid %d is not protected against worker death", proc.pid)


def _open_gate(proc: subprocess.Popen[bytes], rlimits: tuple[tuple[int, int, int], ...],
               write_fd: int, watch: bool = False) -> None:
    """Set ``rlimits`` on the waiting shell with prlimit(2), put it in its cgroup and,
    with ``watch``, under the watchdog; then let it go on.

    A shell in a job cgroup is covered by the watchdog's sweep of this process's
    cgroups (:meth:`~obdask.payloads.reaper.Watchdog.cover`): no message per job.
    Should this process die before the gate opens, the shell reads EOF and exits.
    """
    try:
        for rid, soft, hard in rlimits:
            resource.prlimit(proc.pid, rid, (soft, hard))
        _join_cgroup(proc, proc.pid)
        group = getattr(proc, "obdask_cgroup", None)
        if watch and (group is None or not watchdog.cover(os.path.dirname(group.path))):
            _watch(proc)
        os.write(write_fd, b"go\n")
    except OSError as exc:
        # The shell is held at the gate, so it cannot have run anything: stop it.
        _killpg(proc.pid, signal.SIGKILL)
        reap(proc)
        raise PayloadError(f"@cmd: could not apply obdask.cmd.limits to the shell ({exc}); "
                           "check the limits, or set obdask.cmd.launcher: preexec") from exc
    finally:
        os.close(write_fd)


def _join_cgroup(proc: subprocess.Popen[bytes], pid: int) -> None:
    """Put the held child in the job's cgroup; without it the job still runs (logged)."""
    group = getattr(proc, "obdask_cgroup", None)
    if group is None:
        return
    try:
        group.add(pid)
    except OSError as exc:
        logger.debug("@cmd: pid %d not put in %s (%s)", pid, group.path, exc)
        group.remove()
        proc.obdask_cgroup = None  # type: ignore[attr-defined]


def _kill_all(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the job's process group and, when it has one, everything in its cgroup."""
    _killpg(proc.pid, sig)
    group = getattr(proc, "obdask_cgroup", None)
    if group is not None:
        group.kill(sig)


def _close_gate(gate: tuple[int, int] | None) -> None:
    if gate is not None:
        os.close(gate[0])
        os.close(gate[1])


def _make_preexec(rlimits: tuple[tuple[int, int, int], ...], pdeathsig: bool) -> Any:
    parent = os.getpid()
    setrlimit = resource.setrlimit if resource is not None else None
    prctl = _prctl if pdeathsig else None

    def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
        for rid, soft, hard in rlimits:
            setrlimit(rid, (soft, hard))
        if prctl is not None:
            # PDEATHSIG fires when the *thread* that forked us exits, not the process:
            # run_command blocks in that thread until the shell is reaped, so it holds.
            # It covers the shell only (it is cleared in the shell's own children).
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the worker died before prctl took effect
                os._exit(127)

    return preexec


def _exec_prefix(shell: str, rlimits: tuple[tuple[int, int, int], ...],
                 pdeathsig: bool) -> list[str] | None:
    """``setpriv``/``prlimit`` argv prefix, or None when a needed tool is missing."""
    setpriv, prlimit = _exec_tools()
    if (pdeathsig and setpriv is None) or (rlimits and prlimit is None):
        return None
    if _which(shell) is None:  # the tools would report it only as exit status 127
        raise PayloadError(f"@cmd: cannot run shell {shell!r} (not found); "
                           "set obdask.cmd.shell to an existing shell")
    prefix: list[str] = []
    if pdeathsig:  # setpriv sets PR_SET_PDEATHSIG, kept across the execs that follow
        prefix += [setpriv, "--pdeathsig", "KILL", "--"]  # type: ignore[list-item]
    if rlimits:
        inf = resource.RLIM_INFINITY
        prefix.append(prlimit)  # type: ignore[arg-type]
        prefix += [f"{_PRLIMIT_OPTS[rid]}={soft}:{'unlimited' if hard == inf else hard}"
                   for rid, soft, hard in rlimits]
        prefix.append("--")
    return prefix


@lru_cache(maxsize=1)
def _exec_tools() -> tuple[str | None, str | None]:
    tools = shutil.which("setpriv"), shutil.which("prlimit")
    if None in tools:
        logger.warning("@cmd: obdask.cmd.launcher 'exec' needs util-linux setpriv and "
                       "prlimit; using 'preexec' where they are missing")
    return tools


@lru_cache(maxsize=16)
def _which(program: str) -> str | None:
    return shutil.which(program)


def collect(proc: subprocess.Popen[bytes], wall: float | None,
             keep: int) -> tuple[bytes, bytes, int, int, bool]:
    """Read stdout/stderr in this thread until the shell exits and the pipes close.

    Returns the kept stdout and stderr, their total sizes, and whether the wall
    timeout expired.  Kills the process group on timeout and once the shell
    has exited (leftover background jobs).
    """
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    counts = {out_fd: 0, err_fd: 0}
    poller = select.poll()
    poller.register(out_fd, select.POLLIN)
    poller.register(err_fd, select.POLLIN)
    pidfd = -1
    try:
        pidfd = os.pidfd_open(proc.pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):  # old kernel or not Linux: poll for the exit
        pidfd = -1
    open_fds, exited, timed_out, stage = 2, False, False, 0
    limit = None if wall is None else time.monotonic() + wall
    try:
        while open_fds or not exited:
            wait = None if limit is None else max(0.0, limit - time.monotonic())
            if pidfd < 0 and not exited:
                wait = _POLL if wait is None else min(wait, _POLL)
            events = poller.poll(None if wait is None else int(wait * 1000) + 1)
            check_exit = pidfd < 0
            for fd, _ in events:
                if fd == pidfd:
                    check_exit = True
                    continue
                data = os.read(fd, _CHUNK)
                if not data:
                    poller.unregister(fd)
                    open_fds -= 1
                    continue
                counts[fd] += len(data)
                buf = bufs[fd]
                if len(buf) < keep:
                    buf += data[:keep - len(buf)]
            if check_exit and not exited and _has_exited(proc.pid):
                exited = True
                if pidfd >= 0:
                    poller.unregister(pidfd)
                _kill_all(proc, signal.SIGKILL)  # background jobs left in the group
                limit = time.monotonic() + _DRAIN
            if limit is None or time.monotonic() < limit:
                continue
            if exited or stage == 2:
                break  # pipes held open by a process outside the group, or unkillable
            if stage == 0:
                timed_out = True
                _kill_all(proc, signal.SIGTERM)
                limit, stage = time.monotonic() + _TERM_GRACE, 1
            else:
                _kill_all(proc, signal.SIGKILL)
                limit, stage = time.monotonic() + 10.0, 2
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return (bytes(bufs[out_fd]), bytes(bufs[err_fd]), counts[out_fd], counts[err_fd],
            timed_out)


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its pid stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill what is left of the process group, then reap the shell and close pipes."""
    if proc.returncode is None:
        # the shell is not reaped yet, so its pid (the group id) cannot have been reused
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    group = getattr(proc, "obdask_cgroup", None)
    if group is not None:  # setsid'd or double-forked leftovers die with it
        group.release()
        proc.obdask_cgroup = None  # type: ignore[attr-defined]
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    if getattr(proc, "obdask_watched", False):
        # reaped: its group id may be reused, so the watchdog must not kill it
        watchdog.forget(proc.pid)
        proc.obdask_watched = False  # type: ignore[attr-defined]
