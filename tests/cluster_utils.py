"""Real ``dask scheduler`` / ``dask worker`` subprocesses on loopback, for slow tests.

:class:`ProcessCluster` starts a scheduler on a random port (``--port 0`` plus
``--scheduler-file``) with obdask's scheduler preload, then workers that each
get their own ``--local-directory``, ``--nthreads 1`` and obdask's worker
preload.  Every process runs in its own session, so teardown can kill a
nanny together with its worker (``os.killpg``).  Logs go to files next to the
scheduler file; :meth:`ProcessCluster.logs` returns their tails for assertion
messages.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from obdask.plan import Plan

REPO = Path(__file__).resolve().parents[1]

#: Seconds a process may take to start on a loaded 2-core machine.
START_TIMEOUT = 90.0


def dask_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``dask`` subprocess: ours, with the repository importable."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def spawn(args: list[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """``python -m dask *args`` in a new session, output to ``log``."""
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dask_env(env),
            cwd=log.parent,
            start_new_session=True,  # own process group: killpg takes nanny + worker
        )


def kill(procs: Iterable[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM each process group, then SIGKILL what is left after ``grace`` seconds."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


class ProcessCluster:
    """A scheduler and named workers as real subprocesses; see the module docstring.

    Use as a context manager; :attr:`client` is a synchronous
    ``distributed.Client`` of the scheduler.

    Parameters
    ----------
    folder : Path
        Where the scheduler file, logs and worker directories go.
    scheduler_env : mapping, optional
        Extra environment of the scheduler (e.g. ``DASK_DISTRIBUTED__...``).
    """

    def __init__(self, folder: Path, scheduler_env: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.scheduler_env = dict(scheduler_env or {})
        self.scheduler_file = self.folder / "scheduler.json"
        self.address = ""
        self.scheduler: subprocess.Popen | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.client: Any = None

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> ProcessCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the scheduler and connect :attr:`client`."""
        from distributed import Client

        self.scheduler = spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(self.scheduler_file),
             "--preload", "obdask.preload.scheduler"],
            self.folder / "scheduler.log", self.scheduler_env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = self.scheduler_file.read_text() if self.scheduler_file.exists() else ""
            if text.strip():
                try:
                    self.address = json.loads(text)["address"]
                    break
                except (ValueError, KeyError):
                    pass  # half written
            assert self.scheduler.poll() is None, self.logs()
            assert time.monotonic() < deadline, "scheduler did not start\n" + self.logs()
            time.sleep(0.1)
        self.client = Client(self.address, timeout=60)

    def close(self) -> None:
        """Close the client, then stop workers and scheduler."""
        if self.client is not None:
            try:
                self.client.close(timeout=10)
            except Exception:  # noqa: BLE001 - teardown must go on
                pass
            self.client = None
        kill(self.procs.values())
        kill([self.scheduler] if self.scheduler is not None else [])

    # -------------------------------------------------------------- workers

    def add_worker(self, name: str, *extra: str, nanny: bool = True,
                   env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start ``dask worker ADDR ... --preload obdask.preload.worker *extra``.

        The scheduler address comes first (see docs/cluster.md: otherwise the
        first preload option would be taken as the address).  ``extra`` is
        appended after the preload, so preload options such as ``--lanes=2``
        go there; ``--resources`` may go there too.
        """
        local = self.folder / name
        local.mkdir(exist_ok=True)
        args = ["worker", self.address, "--host", "127.0.0.1", "--no-dashboard",
                "--nthreads", "1", "--name", name, "--local-directory", str(local),
                *([] if nanny else ["--no-nanny"]),
                "--preload", "obdask.preload.worker", *extra]
        proc = spawn(args, self.folder / f"{name}.log", env)
        self.procs[name] = proc
        return proc

    def workers(self) -> dict[str, str]:
        """``{worker name: address}`` of the workers the scheduler knows now."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {str(w.get("name")): addr for addr, w in info.items()}

    def resources(self, name: str) -> dict[str, float]:
        """Resources worker ``name`` declared to the scheduler."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return next(dict(w["resources"]) for w in info.values() if str(w["name"]) == name)

    def wait_for(self, *names: str, timeout: float = START_TIMEOUT,
                 exclude: Iterable[str] = ()) -> dict[str, str]:
        """Wait until every worker of ``names`` is registered; ``{name: address}``.

        ``exclude``: addresses that do not count (a dead worker being replaced).
        """
        deadline = time.monotonic() + timeout
        exclude = set(exclude)
        while True:
            known = {n: a for n, a in self.workers().items() if a not in exclude}
            if all(n in known for n in names):
                return {n: known[n] for n in names}
            for n in names:
                proc = self.procs.get(n)
                assert proc is None or proc.poll() is None, f"worker {n} exited\n" + self.logs()
            assert time.monotonic() < deadline, f"workers {names} did not join\n" + self.logs()
            time.sleep(0.1)

    def stop_worker(self, name: str, timeout: float = 60.0) -> None:
        """Stop worker ``name`` (its whole process group) and wait for the scheduler to see it."""
        address = self.workers().get(name)
        kill([self.procs.pop(name)])
        deadline = time.monotonic() + timeout
        while address is not None and address in self.workers().values():
            assert time.monotonic() < deadline, f"scheduler still lists {name}"
            time.sleep(0.1)

    def worker_pids(self) -> dict[str, int]:
        """``{address: pid}`` of the processes that run the tasks (not the nannies)."""
        return self.client.run(os.getpid)

    def logs(self, tail: int = 3000) -> str:
        """The last ``tail`` characters of every log, for assertion messages."""
        parts = []
        for log in sorted(self.folder.glob("*.log")):
            text = log.read_text(errors="replace")[-tail:]
            parts.append(f"----- {log.name}\n{text}")
        return "\n".join(parts)


def git_repository(path: Path, name: str) -> str:
    """``git init`` + one commit of ``README.md`` in ``path``; returns the HEAD sha."""
    path.mkdir(parents=True)
    (path / "README.md").write_text(f"# {name}\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for args in (["init", "-q", "-b", "main"], ["add", "README.md"], ["commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=path, check=True, env=env, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True, text=True,
                          capture_output=True).stdout.strip()


def wait_gone(pid: int, within: float = 5.0) -> bool:
    """True once ``pid`` no longer exists (a zombie counts as gone)."""
    import psutil

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------ plans, worker loss

#: Worker environment for tests that need host pids or write outside the workspace:
#: the bubblewrap sandbox (docs/security.md) hides both.
NO_SANDBOX = {"DASK_OBDASK__CMD__SANDBOX__MODE": "off"}


def write_plan(folder: Path, name: str, lines: list[str]) -> Plan:
    """Write ``lines`` as plan ``name`` (its plan_id too) and parse it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.md"
    path.write_text(f"# Plan: {name}\nplan_id={name}\n\n" + "\n".join(lines) + "\n")
    return Plan.from_file(path)


def kill_mid_sleep(cluster: ProcessCluster, lines: Path, after: int,
                    deadline: float) -> dict[str, Any]:
    """Wait for ``after`` lines, then SIGKILL a worker while a job of it sleeps.

    The victim is a worker that already holds results in memory (so the
    scheduler must re-run those tasks) and is running ``sleep`` in a job's
    shell.  The shell is SIGSTOPped first, and the worker killed only if its
    ``sleep`` is still alive: the ``echo`` after it cannot have run, so that
    job's line is not written by the attempt that dies.  The stopped shell
    can then only go away through ``PR_SET_PDEATHSIG`` (obdask.payloads.cmd).
    """
    import psutil

    while time.monotonic() < deadline:
        if lines.exists() and len(lines.read_text().splitlines()) >= after:
            break
        time.sleep(0.01)
    pids = cluster.worker_pids()
    while time.monotonic() < deadline:
        holding = cluster.client.run_on_scheduler(
            lambda dask_scheduler: {a: len(ws.has_what)
                                    for a, ws in dask_scheduler.workers.items()})
        for address, pid in pids.items():
            if not holding.get(address):
                continue
            try:
                shells = psutil.Process(pid).children()
            except psutil.NoSuchProcess:
                continue
            for shell in shells:
                try:
                    match = re.search(r"echo (\S+) >>", " ".join(shell.cmdline()))
                    if not match:
                        continue
                    shell.suspend()
                    sleeping = [c for c in shell.children() if c.name() == "sleep"
                                and c.status() != psutil.STATUS_ZOMBIE]
                    if not sleeping:
                        shell.resume()
                        continue
                    os.kill(pid, signal.SIGKILL)
                    return {"address": address, "pid": pid, "step": match.group(1),
                            "family": [shell, *sleeping], "killed_at": time.monotonic()}
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.002)
    raise AssertionError("found no worker in the middle of a job's sleep")


def run_killing_a_worker(cluster: ProcessCluster, plan: Plan, lines: Path, after: int,
                         within: float = 120.0) -> tuple[Any, dict[str, Any]]:
    """``obdask.run(plan)`` on ``cluster`` while a thread kills a worker mid-job.

    The thread runs :func:`kill_mid_sleep` (``lines``: the file the plan's jobs append
    their ids to); returns the run's result and what was killed (``address``, ``pid``,
    ``step``, ``family``, ``killed_at``), after asserting a worker was killed.
    """
    import obdask

    killed: dict[str, Any] = {}
    errors: list[BaseException] = []

    def killer() -> None:
        try:
            killed.update(kill_mid_sleep(cluster, lines, after=after,
                                         deadline=time.monotonic() + within))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = obdask.run(plan, cluster.client)
    thread.join(timeout=60)
    assert not errors, errors
    assert killed, "the worker was never killed"
    return result, killed
