"""The ``@file:`` executor: fetch through fsspec, verify, apply or test.

* ``@file:x.diff#apply`` applies a unified diff to the workspace with
  ``git apply`` after ``git apply --check``: a diff that does not apply
  fails before anything changes.
* ``@file:x#test`` checks the file exists (and matches ``#sha1=``).
* ``@file:spec.md`` alone is a model task (:mod:`obdask.llm`).

Paths are relative to the plan's folder; any fsspec URL (``s3://``,
``memory://``, ``file://``) works, with options from ``obdask.storage-options``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from obdask import config
from obdask.artifacts import sha1_bytes
from obdask.exceptions import PayloadError
from obdask.payloads.read import read_payload_file
from obdask.payloads.sandbox import confine_diff

if TYPE_CHECKING:
    from obdask.compile import JobSpec
    from obdask.context import RunContext

logger = logging.getLogger(__name__)

def execute_file(spec: JobSpec, ctx: RunContext,
                 deps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Run an ``@file:`` payload; returns result fields for the job record."""
    payload = spec.payload
    data = read_payload_file(spec, ctx, deps)
    result: dict[str, Any] = {"input_sha1": sha1_bytes(data), "input_bytes": len(data)}
    if payload.apply:
        result.update(apply_diff(spec, ctx, data))
    return result


def _git(args: list[str], cwd: str, spec: JobSpec, patch: str) -> subprocess.CompletedProcess:
    limit = spec.timeout or config.get_seconds("run.apply-timeout")
    try:
        return subprocess.run(["git", *args, patch], cwd=cwd, capture_output=True, text=True,
                              timeout=limit, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise PayloadError(f"job {spec.key}: git is not installed on this worker") from exc
    except subprocess.TimeoutExpired as exc:
        raise PayloadError(f"job {spec.key}: git {args[0]} timed out") from exc


def apply_diff(spec: JobSpec, ctx: RunContext, diff: bytes) -> dict[str, Any]:
    """``git apply --check`` then ``git apply`` in the workspace (all or nothing).

    Idempotent: a diff already applied to the workspace (it does not apply
    forwards but reverses cleanly) is recorded as ``already_applied`` and left
    alone, so a job re-run after a worker died mid-way does not fail or apply twice.
    """
    workspace = ctx.workspace
    if not os.path.isdir(workspace):
        raise PayloadError(f"job {spec.key}: workspace {workspace} does not exist")
    if not diff.strip():
        raise PayloadError(f"job {spec.key}: {spec.payload.body} is empty, nothing to apply")
    confine_diff(diff, workspace, what=f"job {spec.key}: {spec.payload.body}")  # no escapes
    fd, patch = tempfile.mkstemp(suffix=".diff", prefix="obdask-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(diff)
        check = _git(["apply", "--check", "--whitespace=nowarn"], workspace, spec, patch)
        if check.returncode != 0 and _git(["apply", "--reverse", "--check",
                                           "--whitespace=nowarn"], workspace, spec,
                                          patch).returncode == 0:
            stat = _git(["apply", "--numstat"], workspace, spec, patch).stdout
            files = [line.split("\t", 2)[-1] for line in stat.splitlines() if line.strip()]
            return {"applied": False, "already_applied": True, "files": files,
                    "diff": ctx.artifacts.put(diff)}
        if check.returncode != 0:
            reason = check.stderr.strip().splitlines()
            raise PayloadError(
                f"job {spec.key}: {spec.payload.body} does not apply to {workspace}: "
                f"{reason[0] if reason else 'git apply --check failed'} (workspace untouched)"
            )
        done = _git(["apply", "--whitespace=nowarn"], workspace, spec, patch)
        if done.returncode != 0:
            raise PayloadError(f"job {spec.key}: git apply failed: {done.stderr.strip()}")
        stat = _git(["apply", "--numstat"], workspace, spec, patch).stdout
    finally:
        os.unlink(patch)
    files = [line.split("\t", 2)[-1] for line in stat.splitlines() if line.strip()]
    return {"applied": True, "files": files, "diff": ctx.artifacts.put(diff)}
