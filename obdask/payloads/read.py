"""Read a job's ``@file:`` content: a path or fsspec URL, a staged copy, or a dependency's output.

Shared by the ``apply``/``test`` executors (:mod:`obdask.payloads.file`) and the
``model`` executor (:mod:`obdask.llm.task`), so neither imports the other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import fsspec

from obdask.artifacts import sha1_bytes
from obdask.exceptions import IntegrityError, PayloadError

if TYPE_CHECKING:
    from obdask.compile import JobSpec
    from obdask.context import RunContext

logger = logging.getLogger(__name__)

JOB_PREFIX = "job:"  # @file:job:<step> reads a dependency's stored output


def _job_output(spec: JobSpec, ctx: RunContext, deps: Sequence[dict[str, Any]]) -> bytes:
    """``@file:job:<step>``: the reply (or stdout) a dependency stored as an artifact."""
    step = spec.payload.body[len(JOB_PREFIX):]
    for dep in deps:
        if dep.get("step") == step:
            key = dep.get("reply") or dep.get("stdout")
            if not key:
                raise PayloadError(f"job {spec.key}: step {step!r} produced no output")
            return ctx.artifacts.get(key)
    raise PayloadError(f"job {spec.key}: the output of step {step!r} is not available here "
                       "(it must be a dependency that ran in this run; resumed or "
                       "deduplicated steps pass no output)")


def read_payload_file(spec: JobSpec, ctx: RunContext,
                      deps: Sequence[dict[str, Any]] = ()) -> bytes:
    """Content of the step's file, verified against ``#sha1=`` when pinned."""
    if spec.payload.body.startswith(JOB_PREFIX):
        return _verify(spec, f"output of {spec.payload.body}", _job_output(spec, ctx, deps))
    if spec.staged:  # the client staged the plan-local file in the artifact store
        return _verify(spec, spec.payload.body, ctx.artifacts.get(spec.staged))
    url = ctx.resolve(spec.payload.body)
    try:
        with fsspec.open(url, "rb", **ctx.options_for(url)) as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise PayloadError(f"job {spec.key}: file not found: {url}") from exc
    except IsADirectoryError as exc:
        raise PayloadError(f"job {spec.key}: {url} is a folder, not a file") from exc
    except (OSError, ValueError, ImportError) as exc:
        raise PayloadError(f"job {spec.key}: cannot read {url}: {exc}") from exc
    return _verify(spec, url, data)


def _verify(spec: JobSpec, what: str, data: bytes) -> bytes:
    pinned = spec.payload.sha1
    if pinned and sha1_bytes(data) != pinned:
        raise IntegrityError(
            f"job {spec.key}: {what} has sha1 {sha1_bytes(data)}, the plan pins {pinned}; "
            "update #sha1= or restore the file"
        )
    return data
