"""Prepare a run without a cluster: stores, workspace, resume and dedupe state, compile.

:func:`prepare` resolves the record and artifact stores (argument, config, else
``<plan folder>/.obdask/...``) and the workspace, reads what an earlier run
completed (``resume``) and which steps' outputs already exist (``dedupe``), stages
plan-local ``@file:`` payloads for remote workers, and compiles the plan into jobs
and the frozen :class:`~obdask.context.RunContext` every task carries.
"""

from __future__ import annotations

import os

from obdask import config, settings
from obdask.artifacts import ArtifactStore
from obdask.compile import CompiledPlan, compile_plan
from obdask.context import CommandPolicy, RunContext
from obdask.exceptions import PlanError
from obdask.plan import Plan
from obdask.records import RunStore, new_run_id


def store_url(kind: str, explicit: str | None, plan: Plan) -> str:
    url = config.get_str(f"store.{kind}", explicit)
    return url or os.path.join(plan.folder, ".obdask", kind)


def resolve_workspace(plan: Plan, workspace: str | None) -> str:
    """Workspace folder: argument, plan's ``workspace=``, config, or the plan's folder."""
    chosen = (os.fspath(workspace) if workspace else None) or plan.workspace or \
        config.get_str("workspace")
    if not chosen:
        return plan.folder
    if chosen.startswith("git:"):
        return chosen  # each job runs in its worker's checkout (obdask.workspace)
    path = chosen if os.path.isabs(chosen) else os.path.join(plan.folder, chosen)
    if not os.path.isdir(path):
        raise PlanError(f"{plan.path or plan.plan_id}: workspace {path} is not a folder")
    return path


def prepare(plan: Plan, *, workspace: str | None = None, resume: bool = False,
            artifacts: str | None = None, records: str | None = None,
            run_id: str | None = None) -> tuple[CompiledPlan, RunContext]:
    """Resolve stores, resume and dedupe state, and compile (no cluster needed).

    Resources, lanes and routes are left to the placement phase
    (:func:`obdask.placement.place`).
    """
    settings.check()  # every bad setting, naming its key, before anything is read or run
    from obdask.confine import check_plan

    check_plan(plan, resolve_workspace(plan, workspace))  # no file or workspace escapes
    storage_options = dict(config.get("storage-options") or {})
    art_url = store_url("artifacts", artifacts, plan)
    rec_url = store_url("records", records, plan)
    default_folder = os.path.join(plan.folder, ".obdask")
    if any(os.path.dirname(u) == default_folder for u in (art_url, rec_url)):
        from obdask.outputs import ensure_gitignore

        ensure_gitignore(default_folder)  # not the user's files: git should not list them
    art = ArtifactStore(art_url, config.storage_options(art_url, storage_options))
    art.check_writable()  # before any job: every one would fail on it
    store = RunStore(rec_url, plan.plan_id, run_id or new_run_id(),
                     config.storage_options(rec_url, storage_options))
    completed = store.completed_before([s.id for s in plan.steps]) if resume else {}
    dedupe = {s.dedupe_key: s.id for s in plan.steps if s.dedupe_key and not s.done}
    deduplicated = [dedupe[k] for k in art.done_keys(dedupe)]
    compiled = compile_plan(
        plan, completed=completed, deduplicated=deduplicated, staged=stage_files(plan, art),
        default_retries=config.get_int("run.retries"),
        default_timeout=config.get_seconds("run.timeout"),
        localities_for=localities_policy(plan),
    )
    has_models = any(step.is_model_task for step in plan.steps)
    endpoints, models = RunContext.llm_from_config() if has_models else ((), {})
    ctx = RunContext(run_id=store.run_id, plan_id=plan.plan_id,
                     workspace=resolve_workspace(plan, workspace), plan_folder=plan.folder,
                     artifacts=art, records=store, command=CommandPolicy.from_config(),
                     storage_options=storage_options, llm_endpoints=endpoints,
                     llm_models=models)
    return compiled, ctx


def stage_files(plan: Plan, store: ArtifactStore) -> dict[str, str]:
    """Put plan-local ``@file:`` payloads in the artifact store for remote workers.

    ``obdask.store.stage-files``: ``auto`` stages when the artifact store is not
    on local disk (a real cluster whose workers cannot see the plan's folder).
    Missing files are left alone: their jobs fail with a clear error as usual.
    """
    mode = config.get("store.stage-files")
    if mode is False or (mode == "auto" and store.is_local):
        return {}
    staged = {}
    for step in plan.steps:
        body = step.payload.body
        if step.payload.prefix != "file" or step.done or "://" in body or \
                body.startswith("job:"):
            continue
        path = body if os.path.isabs(body) else os.path.join(plan.folder, body)
        try:
            with open(path, "rb") as f:
                staged[step.id] = store.put(f.read())
        except OSError:
            continue
    return staged


def localities_policy(plan: Plan):
    from obdask.placement import locality_keys

    if not config.get("placement.locality"):
        return None
    steps_by_id = plan.steps_by_id
    files = bool(config.get("placement.file-locality"))
    base = plan.folder  # a property that resolves the plan's path: once, not once a step
    return lambda step: locality_keys(step, steps_by_id, base=base, files=files)
