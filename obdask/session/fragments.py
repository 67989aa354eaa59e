"""Plan fragments: jobs a session process asks for, compiled and run on the cluster.

A process's reply may hold one fenced block in the plan format (``docs/plan-format.md``)::

    ```plan
    - [ ] id=hello lane=1 payload=@cmd:echo hello
    - [ ] id=check lane=3 deps=hello payload=@cmd:test -d .
    ```

The driver parses it (a ``# Plan:`` header is added when missing), and runs it through
the ordinary path, :func:`obdask.runner.run` on the driver's ``worker_client`` (compile,
place, submit, records).  The fragment's plan id names its process,
``<session>.<index>-<position>``, so its run records are found from the process; the job
records come back into the process snapshot with ``session``, ``schedule`` and
``process`` filled.  A fragment is run with ``resume=True``: a driver that makes the
process's call again after a crash does not repeat the fragment's completed jobs.

A fragment that does not parse or compile raises :class:`FragmentError` naming the
process and the cause; the driver records it as an ``X`` of that process.
"""

from __future__ import annotations

import logging
import posixpath
import re
from typing import Any

from obdask.exceptions import ObdaskError, SessionError

logger = logging.getLogger(__name__)

__all__ = ["FragmentError", "extract", "run_fragment"]

#: ```plan (or ```obdask-plan) ... ``` in a process's reply; the first one counts.
FENCE = re.compile(r"^```(?:obdask-)?plan[ \t]*\n(.*?)^```", re.S | re.M)
MAX_JOBS_LISTED = 200  # job records kept in a snapshot (the run records hold them all)


class FragmentError(SessionError):
    """A process's plan fragment that does not parse or compile (recorded as an ``X``)."""


def extract(text: str) -> str | None:
    """The plan fragment in a process's reply, or None."""
    m = FENCE.search(text or "")
    return m.group(1) if m else None


def fragment_plan_id(session_id: str, index: int, position: str) -> str:
    """``<session>.<index>-<position>``: the plan id of a process's fragment."""
    return f"{session_id}.{index:04d}-{position}"


def _plan(text: str, plan_id: str, folder: str) -> Any:
    from obdask.plan import Plan

    if not re.search(r"^#\s*Plan:", text, re.M):
        text = f"# Plan: {plan_id}\n{text}"
    # A path in the workspace (never written): relative @file: paths resolve there.
    return Plan.from_text(text, path=posixpath.join(folder, f"{plan_id}.md"), plan_id=plan_id)


def run_fragment(client: Any, text: str, *, session_id: str, index: int, position: str,
                 workspace: str, records: str, artifacts: str) -> dict[str, Any]:
    """Compile and run the fragment ``text`` of process ``index`` at ``position``.

    Parameters
    ----------
    client
        The driver's ``worker_client``.
    workspace
        Folder the fragment's ``@cmd:`` steps run in.
    records, artifacts
        fsspec URLs of its run records and artifacts.

    Returns
    -------
    dict
        ``plan_id``, ``run_id``, ``records`` (the records URL), ``location`` (the
        run's folder there), ``ok``, ``summary`` and ``jobs``:
        one record per job (``step``, ``key``, ``status``, ``exit_code``, ``error``)
        with ``session``, ``schedule`` and ``process``.

    Raises
    ------
    FragmentError
        The fragment does not parse or compile (plan errors, confinement, placement).
    """
    from obdask.runner import run

    plan_id = fragment_plan_id(session_id, index, position)
    where = f"session {session_id}: the plan fragment of process {index} ({position})"
    try:
        plan = _plan(text, plan_id, workspace)
        result = run(plan, client, workspace=workspace, resume=True, records=records,
                     artifacts=artifacts)
    except ObdaskError as exc:  # PlanError, ConfigError, placement: the fragment's fault
        raise FragmentError(f"{where} does not compile: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a fragment never stops the driver
        raise FragmentError(f"{where} did not run: {type(exc).__name__}: {exc}") from exc
    link = {"session": session_id, "schedule": position[:2], "process": position[2:]}
    jobs = [{"step": r.get("step") or r.get("id"), "key": r.get("key"),
             "status": r.get("status"), "exit_code": r.get("exit_code"),
             "error": (str(r["error"])[:500] if r.get("error") else None), **link}
            for r in result.records]
    logger.info("%s: run %s, %d jobs, ok=%s", where, result.run_id, len(jobs), result.ok)
    return {"plan_id": plan_id, "run_id": result.run_id, "records": records,
            "location": result.location,
            "ok": result.ok, "summary": dict(result.summary), "jobs": jobs[:MAX_JOBS_LISTED],
            "jobs_total": len(jobs), **link}
