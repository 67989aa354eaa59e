"""Worker-side workspaces: warm git checkouts kept per worker.

A job whose step names a repository (``locality=git:<url>@<rev>``, an
``@git:<url>@<rev>`` dependency, or a plan ``workspace=git:<url>@<rev>``)
runs in a checkout of that revision on its worker.  The clone is made once
per worker and kept in the worker's local directory (a *warm clone*); the
scheduler plugin learns about it so later jobs for the same repository are
routed to this worker (:mod:`obdask.placement`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from typing import TYPE_CHECKING

from obdask import config
from obdask.exceptions import PayloadError

if TYPE_CHECKING:
    from obdask.compile import JobSpec

logger = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def split_git(source: str) -> tuple[str, str | None]:
    """``git:<url>@<rev>`` -> ``(url, rev)``; rev is None when not given.

    The revision is the text after the last ``@`` unless it holds a ``:``
    (then the ``@`` belongs to an scp-style URL such as ``git@host:org/repo``).
    """
    body = source[4:] if source.startswith("git:") else source
    url, sep, rev = body.rpartition("@")
    if not sep or not url or ":" in rev or not rev:
        return body, None
    return url, rev


def _lock(path: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def _git(args: list[str], cwd: str | None, key: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL,
                              timeout=config.get_seconds("run.git-timeout"),
                              env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except FileNotFoundError as exc:
        raise PayloadError(f"job {key}: git is not installed on this worker") from exc
    except subprocess.TimeoutExpired as exc:
        raise PayloadError(f"job {key}: git {args[0]} timed out") from exc
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise PayloadError(f"job {key}: git {args[0]} failed: {reason}")
    return done.stdout


def _scratch() -> str:
    try:
        from distributed import get_worker

        return get_worker().local_directory
    except (ImportError, ValueError):
        return tempfile.gettempdir()


def checkout(source: str, key: str = "?", scratch: str | None = None) -> tuple[str, bool]:
    """A worker-local checkout of ``git:<url>@<rev>``; returns ``(path, warm)``.

    ``warm`` is True when this worker already held a clone of the repository.
    """
    url, rev = split_git(source)
    if url.startswith("-") or (rev or "").startswith("-"):
        # Never let plan text reach git as an option (--upload-pack=... runs a command).
        raise PayloadError(f"job {key}: {source!r}: a git URL or revision cannot start with '-'")
    root = os.path.join(scratch or _scratch(), "obdask-git",
                        hashlib.sha1(url.encode()).hexdigest()[:16])
    mirror = os.path.join(root, "clone")
    with _lock(root):
        warm = os.path.isdir(os.path.join(mirror, ".git"))
        if not warm:
            os.makedirs(root, exist_ok=True)
            _git(["clone", "--quiet", "--", url, mirror], None, key)
        if rev is None:
            return mirror, warm
        tree = os.path.join(root, "rev-" + hashlib.sha1(rev.encode()).hexdigest()[:12])
        if not os.path.isdir(tree):
            if warm and subprocess.run(["git", "rev-parse", "--verify", "--quiet",
                                        f"{rev}^{{commit}}"], cwd=mirror,
                                       capture_output=True).returncode != 0:
                _git(["fetch", "--quiet", "origin"], mirror, key)
            _git(["worktree", "add", "--quiet", "--detach", "--", tree, rev], mirror, key)
        return tree, warm


def job_workspace(spec: JobSpec, default: str) -> tuple[str, bool | None]:
    """Folder a job runs in and whether its checkout was warm (None: no checkout)."""
    if not spec.checkout:
        return default, None
    path, warm = checkout(spec.checkout, spec.key)
    return path, warm
