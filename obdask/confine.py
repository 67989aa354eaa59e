"""Path confinement: where a plan may read files from and which folder it may change.

Checked at compile time, before any job runs, with an error naming the step:

* a local ``@file:`` path must resolve (symlinks followed, ``..`` folded) inside the
  plan's folder, the workspace or one of ``obdask.security.roots``; an absolute path,
  a ``..`` or a symlink leading elsewhere (``/etc/passwd``, ``~/.ssh``) is refused;
* a remote ``@file:`` URL must use a protocol of ``obdask.security.protocols``
  (``http(s)``, ``ssh``, ``sftp``... only when listed there);
* the workspace may not be a system folder (``/``, ``/etc``, ``/usr``...), nor,
  when ``obdask.security.roots`` is set, lie outside those roots.

``@cmd:`` jobs are confined by the sandbox (:mod:`obdask.payloads.sandbox`) and
``#apply`` diffs by :func:`obdask.payloads.sandbox.confine_diff`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from obdask import config
from obdask.exceptions import PlanError

if TYPE_CHECKING:
    from obdask.plan import Plan

logger = logging.getLogger(__name__)

#: Folders no plan may use as its workspace (a diff there could patch the system).
SYSTEM_FOLDERS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/opt", "/proc",
    "/root", "/run", "/sbin", "/srv", "/sys", "/usr", "/var",
})


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def roots() -> list[str]:
    """``obdask.security.roots`` as real paths (empty: no extra roots)."""
    return [os.path.realpath(os.path.expanduser(r))
            for r in config.get_str_list("security.roots")]


def check_workspace(path: str, where: str, plan_folder: str | None = None) -> None:
    """Refuse a system folder, or a folder outside the plan's folder and the configured
    roots (when roots are configured), as workspace."""
    real = os.path.realpath(path)
    if real in SYSTEM_FOLDERS or any(real == s or real.startswith(s + "/")
                                     for s in ("/etc", "/usr", "/boot", "/proc", "/sys",
                                               "/dev", "/bin", "/sbin")):
        raise PlanError(f"{where}: workspace {path} is a system folder ({real}); use a "
                        "project folder")
    allowed = roots()
    if plan_folder is not None and allowed:
        allowed.append(os.path.realpath(plan_folder))
    if allowed and not _inside(real, allowed):
        raise PlanError(f"{where}: workspace {path} ({real}) is outside obdask.security.roots "
                        f"({', '.join(allowed)})")


def check_file(step_id: str, line: int, body: str, plan_folder: str, workspace: str,
               where: str) -> None:
    """Refuse an ``@file:`` payload that reads outside the allowed folders or protocols."""
    if body.startswith("job:"):
        return
    at = f"{where}:{line}: step {step_id!r}"
    if "://" in body:
        protocol = body.split("://", 1)[0].lower()
        allowed = {p.lower() for p in config.get_str_list("security.protocols")}
        if protocol not in allowed:
            raise PlanError(f"{at}: @file:{body}: protocol {protocol!r} is not allowed; "
                            f"allowed: {', '.join(sorted(allowed))} (obdask.security.protocols)")
        if protocol not in ("file", "local"):
            return
        body = body.split("://", 1)[1]
    path = body if os.path.isabs(body) else os.path.join(plan_folder, body)
    real = os.path.realpath(path)
    folders = [os.path.realpath(plan_folder), *roots()]
    if workspace and not workspace.startswith("git:"):
        folders.append(os.path.realpath(workspace))
    if not _inside(real, folders):
        raise PlanError(f"{at}: @file:{body} resolves to {real}, outside the plan's folder, "
                        "the workspace and obdask.security.roots; move the file there or add "
                        "its folder to obdask.security.roots")


def check_plan(plan: Plan, workspace: str) -> None:
    """Check every runnable step's ``@file:`` payload and the workspace of ``plan``."""
    where = plan.path or plan.plan_id
    if workspace and not workspace.startswith("git:"):
        check_workspace(workspace, where, plan.folder)
    for step in plan.steps:
        if step.done or step.payload.prefix != "file":
            continue
        check_file(step.id, step.line, step.payload.body, plan.folder, workspace, where)
