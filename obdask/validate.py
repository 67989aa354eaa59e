"""What ``obdask validate`` checks: the plan, and everything ``run`` would refuse.

``run`` refuses some plans only when it gets to them: a ``@cmd:`` line with a
command that is not on ``obdask.cmd.allowlist``, a ``$(...)`` while
``obdask.cmd.allow-substitution`` is off, a command too long for the shell, a
``model=`` role that ``obdask.placement.models`` does not define, a bad
setting.  None of these needs a cluster, so :func:`validate_file` reports
them together with the plan's own errors, each with file and line, in one
pass.  Steps marked done (``- [x]``) never run and are not checked.
"""

from __future__ import annotations

import logging
import os

from obdask import config, settings
from obdask.exceptions import CommandRefused, ConfigError, PayloadError, PlanError
from obdask.plan import Plan, parse_all, read_plan_text

logger = logging.getLogger(__name__)

__all__ = ["validate_file", "validate_plan"]


def validate_file(path: str | os.PathLike[str]) -> tuple[Plan | None, list[str]]:
    """Check the plan file at ``path`` as ``run`` would, without a cluster.

    Returns
    -------
    plan : Plan or None
        The parsed plan when there is no problem, else None.
    problems : list of str
        Every problem, ``file:line: cause``, in line order; settings
        problems (``obdask.<key>: ...``) first.
    """
    path = os.fspath(path)
    try:
        text = read_plan_text(path)
    except PlanError as exc:
        return None, [str(exc)]
    except ConfigError as exc:  # obdask.plan.max-bytes itself is bad
        return None, [str(exc)]
    plan, errors = parse_all(text, path)
    # plan errors and refusals, in line order (a line's plan errors first)
    found = [*zip(errors.lines, errors.items, strict=True), *validate_plan(plan)]
    order = sorted(range(len(found)), key=lambda i: (found[i][0], i))
    merged = _config_problems() + [found[i][1] for i in order]
    return (plan if not merged else None), merged


def validate_plan(plan: Plan) -> list[tuple[int, str]]:
    """Refusals of ``run`` for the steps of a parsed ``plan``: ``(line, message)`` pairs."""
    where = plan.path or "<plan>"
    out: list[tuple[int, str]] = []
    try:
        allow = config.get_str_list("cmd.allowlist")
        allow_sub = config.get_bool("cmd.allow-substitution")
    except ConfigError:
        allow = None  # reported by settings.check(); commands cannot be judged without it
    roles = _roles()
    for step in plan.steps:
        if step.done:
            continue
        prefix = f"{where}:{step.line}: step {step.id!r}: "
        if step.payload.prefix == "cmd" and not step.is_metadata and allow is not None:
            from obdask.payloads.cmd import check_command
            from obdask.payloads.launch import check_length

            try:
                check_length(step.payload.body)
                check_command(step.payload.body, allow, allow_sub)
            except (CommandRefused, PayloadError) as exc:
                out.append((step.line, prefix + str(exc)))
        role = step.model or (_default_role() if step.is_model_task else None)
        if roles is not None and role and role not in roles:
            how = "model=" if step.model else "obdask.placement.default-role"
            out.append((step.line, prefix + f"unknown model role {role!r} ({how}); known "
                        f"roles: {', '.join(sorted(roles)) or 'none'} "
                        "(obdask.placement.models)"))
    return out


def _default_role() -> str | None:
    try:
        return config.get_str("placement.default-role")
    except ConfigError:
        return None  # reported by settings.check()


def _roles() -> set[str] | None:
    try:
        models = config.get("placement.models") or {}
    except KeyError:
        return None
    return {str(role) for role in models} if hasattr(models, "keys") else None


def _config_problems() -> list[str]:
    try:
        settings.check()
    except ConfigError as exc:
        return list(getattr(exc, "errors", [str(exc)]))
    return []
