"""A pids cgroup per ``@cmd:`` job: bounds its process count, finds every process it made.

A process group does not hold a job's processes: ``setsid`` (or a double fork)
leaves it, so killing the group at a timeout leaves such a grandchild
running, and ``RLIMIT_NPROC`` does not apply to root, so a fork bomb run as
root is bounded only by the machine's ``pid_max``.  A cgroup holds every
descendant whatever it does.  When the worker may create cgroups (root, or a
delegated cgroup v2 subtree), each job's shell (or bwrap's sandbox init) is
put, before it runs anything, in a fresh cgroup of the ``pids`` controller
with ``pids.max = obdask.cmd.pids-max``; at its end or timeout every process
listed in it is killed and the cgroup removed.  Where cgroups cannot be made
(an unprivileged worker without delegation) nothing changes: the process
group and, with bwrap, the PID namespace are what hold.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import threading
import time
from functools import lru_cache

from obdask import config

__all__ = ["JobGroup", "create"]

logger = logging.getLogger(__name__)

_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")
_counter = itertools.count()
# Empty job cgroups kept for reuse: mkdir/rmdir of a cgroup cost milliseconds, a pool
# hit costs one write of pids.max.  Removed when the process exits.
_POOL_SIZE = 16
_pool: list[JobGroup] = []
_pool_lock = threading.Lock()


class JobGroup:
    """One job's cgroup: ``add`` the held child, ``kill`` everything in it, ``remove``."""

    def __init__(self, path: str, limit: int | None = None) -> None:
        self.path = path
        #: The ``pids.max`` last written (a pooled group skips rewriting the same value).
        self.limit = limit
        #: Whether the group has ``cgroup.kill`` (cgroup v2, Linux 5.14+); looked up once.
        self.atomic_kill: bool | None = None
        #: Seen empty since the last :meth:`add`: nothing can enter it but by ``add``
        #: (no process is left in it to fork), so :meth:`release` need not look again.
        self.empty = True

    def add(self, pid: int) -> None:
        """Move ``pid`` (still held before running anything) into the cgroup."""
        self.empty = False
        _write(os.path.join(self.path, "cgroup.procs"), b"%d" % pid)

    def pids(self) -> list[int]:
        try:
            fd = os.open(os.path.join(self.path, "cgroup.procs"), os.O_RDONLY)
        except OSError:
            return []
        try:
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
        except OSError:
            return []
        finally:
            os.close(fd)
        return [int(line) for line in data.split()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process in the cgroup; SIGKILL repeats until it is empty (fork bombs).

        The list is read first: a job that left nothing behind (the common case)
        costs that one read, no ``cgroup.kill`` write.
        """
        pids = self.pids()
        if not pids:
            self.empty = True
            return
        kill_file = os.path.join(self.path, "cgroup.kill")
        if self.atomic_kill is None:
            self.atomic_kill = os.path.exists(kill_file)
        if sig == signal.SIGKILL and self.atomic_kill:  # cgroup v2: atomic
            try:
                _write(kill_file, b"1")
            except OSError:
                pass
            pids = self.pids()
        deadline = time.monotonic() + 5.0
        # What is left is mostly exiting already (a sandbox's PID-namespace init outlives
        # bwrap's outer process by a fraction of a millisecond): look again soon, then
        # less and less often (a fork bomb takes longer)
        delay = 0.0002
        while True:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if not pids:
                self.empty = True
                return
            if sig != signal.SIGKILL or time.monotonic() > deadline:
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
            pids = self.pids()

    def release(self) -> None:
        """Kill what is left; keep the empty cgroup for the next job, or remove it."""
        # usually none: the shell's exit found the group empty (or emptied it)
        left = [] if self.empty else self.pids()
        if left:
            self.kill()
            left = self.pids()
        if not left:
            with _pool_lock:
                if len(_pool) < _POOL_SIZE and _pool_owner[0] == os.getpid():
                    _pool.append(self)
                    return
        self.remove()

    def remove(self) -> None:
        """Kill what is left and remove the cgroup (it must be empty)."""
        for _ in range(200):
            self.kill()
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY: a process is still exiting
                time.sleep(0.01)
        logger.warning("@cmd: could not remove the job cgroup %s", self.path)


def create() -> JobGroup | None:
    """A new job cgroup, or None when ``obdask.cmd.pids-max`` is null or cgroups are unavailable."""
    raw = config.get("cmd.pids-max")
    if raw is None:
        return None
    limit = config.get_int("cmd.pids-max", raw, minimum=1)  # one config lookup a job
    parent = _parent()
    if parent is None:
        return None
    with _pool_lock:
        if _pool_owner[0] != os.getpid():  # a forked child: the parent's pool is not ours
            _pool.clear()
            _pool_owner[0] = os.getpid()
        group = _pool.pop() if _pool else None
    if group is not None:
        try:
            if group.limit != limit:
                _write(os.path.join(group.path, "pids.max"), b"%d" % limit)
                group.limit = limit
            elif not os.path.isdir(group.path):  # removed meanwhile (a watchdog's sweep)
                raise FileNotFoundError(group.path)
            return group
        except OSError:
            group.remove()
    path = os.path.join(parent, f"obdask-{os.getpid()}-{next(_counter)}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(int(limit)))
    except OSError as exc:
        logger.debug("@cmd: no job cgroup under %s (%s)", parent, exc)
        try:
            os.rmdir(path)
        except OSError:
            pass
        return None
    return JobGroup(path, int(limit))


_pool_owner = [os.getpid()]


def _write(path: str, data: bytes) -> None:
    """One ``write(2)`` to a cgroup file (no buffered file object: about 20 us less a call)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@atexit.register
def _empty_pool() -> None:
    with _pool_lock:
        groups = list(_pool) if _pool_owner[0] == os.getpid() else []
        _pool.clear()
    for group in groups:
        group.remove()


def _remove_stale(root: str) -> None:
    """Remove empty job cgroups of processes that died without cleaning up (SIGKILL)."""
    for name in os.listdir(root):
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "obdask" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.rmdir(os.path.join(root, name))  # fails (EBUSY) while processes are in it
        except OSError:
            pass


@lru_cache(maxsize=1)
def _parent() -> str | None:
    """A cgroup folder with the pids controller this process may create children in."""
    for root in _ROOTS:
        probe = os.path.join(root, f"obdask-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        try:
            if os.path.exists(os.path.join(probe, "pids.max")):
                _remove_stale(root)
                return root
        finally:
            os.rmdir(probe)
    logger.debug("@cmd: no writable pids cgroup: jobs are held by their process group "
                 "(and the sandbox's PID namespace) only")
    return None
