"""Model tasks: a bare ``@file:spec.md`` step run by the role's Ollama model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from obdask import config
from obdask.exceptions import ModelError

if TYPE_CHECKING:
    from obdask.compile import JobSpec
    from obdask.context import RunContext

logger = logging.getLogger(__name__)


def run_model_task(
    spec: JobSpec, ctx: RunContext, deps: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Send the role's system prompt, the spec and dependency outputs to the model."""
    if not config.get("llm.endpoints"):
        raise ModelError(
            f"job {spec.key}: @file:{spec.payload.body} is a model task but there is no model backend configured "
            "(set obdask.llm.endpoints or OLLAMA_HOST)"
        )
    raise ModelError(f"job {spec.key}: model tasks are not available in this build")
