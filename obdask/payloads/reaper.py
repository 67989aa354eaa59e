"""Kill a worker's running commands when the worker dies: a watchdog process.

Each process that runs ``@cmd:`` payloads starts one small watchdog (once,
lazily).  The watchdog holds the read end of a pipe whose only write end is
in the worker.  The worker writes ``+<pgid>`` when a command's process group
starts and ``-<pgid>`` when it has been reaped.  When the worker dies, for
whatever reason (SIGKILL included), the kernel closes the write end; the
watchdog reads end-of-file and SIGKILLs every process group still
registered, grandchildren included, then exits.

A command held in a job cgroup (:mod:`obdask.payloads.cgroup`) sends no
message: a watchdog started with :meth:`Watchdog.cover` also kills, at
end-of-file, every process in the worker's ``obdask-<worker pid>-*`` cgroups
(what left the process group with ``setsid`` too) and removes those cgroups.
Each message woke the watchdog (two context switches per job); the sweep costs
nothing until the worker dies.

This replaces a per-command ``setpriv --pdeathsig`` exec (about 0.5 ms per
command) with two small pipe writes, and it covers the whole process group
where PDEATHSIG covered only the shell.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading

logger = logging.getLogger(__name__)

# Runs in a bare interpreter (-S -I): no site, no obdask import, a few MB.
WATCHDOG = r"""
import os, signal, sys, time
fd = int(sys.argv[1])
root, owner = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else (None, None)
groups = set()
pending = b""
while True:
    try:
        chunk = os.read(fd, 65536)
    except InterruptedError:
        continue
    if not chunk:
        break
    pending += chunk
    *lines, pending = pending.split(b"\n")
    for line in lines:
        if line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
# Every process in the owner's job cgroups (obdask.payloads.cgroup), setsid'd ones too;
# again until empty (a fork bomb forks between the read and the kill); then remove them.
try:
    names = os.listdir(root) if root else []
except OSError:
    names = []
for name in names:
    if not name.startswith("obdask-%s-" % owner):
        continue
    path = os.path.join(root, name)
    for _ in range(500):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            break
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)
    try:
        os.rmdir(path)
    except OSError:
        pass
"""


class Watchdog:
    """The calling process's watchdog; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1  # process that owns the pipe (a fork gets its own watchdog)
        self._fd = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._at_exit = False
        #: The cgroup folder whose ``obdask-<this pid>-*`` job cgroups the watchdog empties
        #: when this process dies (None: process groups registered by message only).
        self._root: str | None = None

    def _start(self, root: str | None = None) -> None:
        read_end, write_end = os.pipe()  # both non-inheritable by default
        argv = [sys.executable, "-S", "-I", "-c", WATCHDOG, str(read_end)]
        if root is not None:
            argv += [root, str(os.getpid())]
        try:
            self._proc = subprocess.Popen(
                argv,
                pass_fds=(read_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
            )
        finally:
            os.close(read_end)
        self._fd, self._pid, self._root = write_end, os.getpid(), root
        if not self._at_exit:
            # Left to Popen.__del__ at shutdown, a watchdog still reading its pipe is
            # "ResourceWarning: subprocess N is still running"; closed here, it is waited.
            atexit.register(self.close)
            self._at_exit = True

    def _send(self, line: bytes) -> bool:
        with self._lock:
            for _ in range(2):  # a dead watchdog is replaced once
                if self._pid != os.getpid() or self._fd < 0:
                    try:
                        # a watchdog first started for a job outside a cgroup (sandboxed,
                        # say) still empties the cgroups: later jobs need no messages
                        self._start(self._root if self._root is not None else _job_root())
                    except OSError as exc:
                        logger.warning("@cmd: cannot start the watchdog (%s)", exc)
                        return False
                try:
                    os.write(self._fd, line)
                    return True
                except OSError:  # BrokenPipeError: the watchdog died
                    os.close(self._fd)
                    self._fd = -1
            return False

    def close(self, timeout: float = 10.0) -> None:
        """Close the pipe and wait for the watchdog (registered to run at exit).

        The watchdog reads end-of-file: it kills the groups still registered, exactly
        as if this process had died, and exits.  A later :meth:`watch` starts a new one.
        """
        with self._lock:
            if self._pid != os.getpid():  # a fork's copy: the watchdog is the parent's
                return
            proc, self._proc = self._proc, None
            if self._fd >= 0:
                try:
                    os.close(self._fd)
                except OSError:  # already closed (by code that closes fds at exit): nothing to do
                    pass
                self._fd = -1
            if proc is not None:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:  # it exits on its own once it reads EOF
                    logger.warning("@cmd: the watchdog %d did not exit within %gs",
                                   proc.pid, timeout)

    def cover(self, root: str) -> bool:
        """Whether the watchdog empties this process's job cgroups under ``root`` when
        this process dies; starts it so (or replaces a dead one) when it is not running.

        A job held in such a cgroup needs no :meth:`watch`/:meth:`forget` message
        (each one wakes the watchdog: two context switches per job), and its
        setsid'd descendants die with the worker too.  False when the running
        watchdog was started for process groups only: use :meth:`watch` then.
        """
        with self._lock:
            alive = (self._pid == os.getpid() and self._fd >= 0 and self._proc is not None
                     and self._proc.poll() is None)
            if alive:
                return self._root == root
            if self._fd >= 0 and self._pid == os.getpid():
                os.close(self._fd)  # a dead watchdog: start another
            self._fd = -1
            try:
                self._start(root)
            except OSError as exc:
                logger.warning("@cmd: cannot start the watchdog (%s)", exc)
                return False
            return True

    def watch(self, pgid: int) -> bool:
        """Kill process group ``pgid`` if this process dies; False if unprotected."""
        return self._send(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        """``pgid`` has been reaped: do not kill it (its id may be reused)."""
        self._send(b"-%d\n" % pgid)


def _job_root() -> str | None:
    """The cgroup folder this process makes its job cgroups in (None: none)."""
    from obdask.payloads.cgroup import _parent  # late: the watchdog itself needs no config

    try:
        return _parent()
    except OSError:
        return None


watchdog = Watchdog()
