"""Payload executors: one module per pointer prefix, dispatched by :func:`execute`.

``@cmd:`` -> :mod:`obdask.payloads.cmd`, ``@file:`` -> :mod:`obdask.payloads.file`.
Metadata prefixes (``@doc:``, ``@url:``, ``@git:``, ``@gh:``) never reach a
worker: they complete at compile time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from obdask.exceptions import PayloadError

if TYPE_CHECKING:
    from obdask.compile import JobSpec
    from obdask.context import RunContext


def execute(spec: JobSpec, ctx: RunContext, deps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Run one payload; returns result fields, raises PayloadError on failure."""
    prefix = spec.payload.prefix
    if prefix == "cmd":
        from obdask.payloads.cmd import execute_command

        return execute_command(spec, ctx)
    if prefix == "file":
        from obdask.payloads.file import execute_file

        return execute_file(spec, ctx, deps)
    if prefix == "doc":  # only @doc:LLM_TASK steps of plans that opted in get here
        from obdask.llm.task import run_model_task

        return run_model_task(spec, ctx, deps)
    raise PayloadError(f"job {spec.key}: payload @{prefix}: cannot run on a worker")
