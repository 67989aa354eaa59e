"""Testing helpers for code that uses obdask.

Re-exports the Ollama-compatible test server so users can write::

    from obdask.testing import OllamaTestServer

    with OllamaTestServer(models=["qwen2.5-coder:7b"]) as server:
        ...  # point obdask.llm.endpoints (or OLLAMA_HOST) at server.url
"""

from __future__ import annotations

from obdask.llm.testing import (
    BUSY_MESSAGE,
    ModelSpec,
    OllamaTestServer,
    ServerStats,
    count_tokens,
)

__all__ = ["BUSY_MESSAGE", "ModelSpec", "OllamaTestServer", "ServerStats", "count_tokens"]
