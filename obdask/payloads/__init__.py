"""Job executors by kind, in the pattern of fsspec's registry.

Every compiled job has a *kind* (:func:`obdask.compile.job_kind`), decided once at
compile time:

==========  ===================================================  ==================
kind        payload                                              executor
==========  ===================================================  ==================
cmd         ``@cmd:``                                            :mod:`obdask.payloads.cmd`
apply       ``@file:...#apply``                                  :mod:`obdask.payloads.file`
test        ``@file:...#test``                                   :mod:`obdask.payloads.file`
model       a bare ``@file:`` spec, or ``@doc:LLM_TASK``         :mod:`obdask.llm.task`
metadata    ``@doc:``, ``@url:``, ``@git:``, ``@gh:``             none: done at compile time
==========  ===================================================  ==================

:data:`known_executors` maps a kind to the import path of its executor, imported on
first use (so a worker imports only what its jobs need); :func:`register_executor`
adds or replaces a kind, as a third-party package would.  An executor is called
as ``executor(spec, ctx, deps)`` and returns the job record's result fields, or
raises :class:`~obdask.exceptions.PayloadError`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from obdask.exceptions import PayloadError

if TYPE_CHECKING:
    from obdask.compile import JobSpec
    from obdask.context import RunContext

Executor = Callable[["JobSpec", "RunContext", Sequence[dict[str, Any]]], dict[str, Any]]

#: kind -> ``"module:function"`` of its executor (imported on first use).
known_executors: dict[str, str] = {
    "cmd": "obdask.payloads.cmd:execute_command",
    "apply": "obdask.payloads.file:execute_file",
    "test": "obdask.payloads.file:execute_file",
    "model": "obdask.llm.task:run_model_task",
}
_registry: dict[str, Executor] = {}


def register_executor(kind: str, executor: Executor | str, clobber: bool = False) -> None:
    """Add a job kind (or replace one with ``clobber=True``).

    Parameters
    ----------
    kind : str
        The kind name jobs carry.
    executor : callable or str
        ``executor(spec, ctx, deps) -> dict``, or its ``"module:function"`` path.
    """
    if not clobber and (kind in known_executors or kind in _registry):
        raise ValueError(f"job kind {kind!r} is already registered; pass clobber=True to "
                         "replace it")
    _registry.pop(kind, None)
    if isinstance(executor, str):
        known_executors[kind] = executor
    else:
        known_executors.pop(kind, None)
        _registry[kind] = executor


def get_executor(kind: str) -> Executor:
    """The executor of ``kind``, importing it on first use."""
    if kind not in _registry:
        path = known_executors.get(kind)
        if path is None:
            raise PayloadError(f"no executor for job kind {kind!r}; known: "
                               f"{', '.join(sorted(set(known_executors) | set(_registry)))}")
        module, _, name = path.partition(":")
        _registry[kind] = getattr(importlib.import_module(module), name)
    return _registry[kind]


def execute(spec: JobSpec, ctx: RunContext, deps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Run one job with the executor of its kind; raises PayloadError on failure."""
    if spec.kind == "metadata":
        raise PayloadError(f"job {spec.key}: payload {spec.payload.raw} cannot run on a "
                           "worker (metadata completes at compile time)")
    return get_executor(spec.kind)(spec, ctx, deps)
