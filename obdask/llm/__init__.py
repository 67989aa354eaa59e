"""Model calls from Dask tasks: endpoint pool, token accounting and budgets.

Submodules
----------
obdask.llm.client
    :func:`~obdask.llm.client.call_model`, the worker-side function that makes one model call.
obdask.llm.pool
    Endpoint discovery, health, per-(endpoint, model) concurrency caps.
obdask.llm.budget
    Token budgets kept on the scheduler (:mod:`obdask.llm.budget`).
obdask.llm.testing
    :class:`~obdask.llm.testing.OllamaTestServer`, an Ollama-compatible server for tests.

The heavy submodules (they need the optional ``ollama`` package) are imported
lazily, so ``import obdask.llm`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "call_model": "obdask.llm.client",
    "ModelReply": "obdask.llm.client",
    "token_records": "obdask.llm.client",
    "get_pool": "obdask.llm.pool",
    "EndpointPool": "obdask.llm.pool",
    "budgets": "obdask.llm.budget",
    "set_budget": "obdask.llm.budget",
    "remove_budget": "obdask.llm.budget",
    "reservations": "obdask.llm.budget",
    "OllamaTestServer": "obdask.llm.testing",
    "ModelSpec": "obdask.llm.testing",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'obdask.llm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
