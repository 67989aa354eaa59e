"""An Ollama-compatible HTTP server for tests (no GPU, no model weights).

:class:`OllamaTestServer` listens on loopback (a free port by default) and
speaks the Ollama REST wire format closely enough that the official
``ollama.Client(host=server.url)`` works against it unchanged:

* ``GET/HEAD /``, ``/api/version``, ``/api/tags``, ``/api/ps``; ``POST /api/show``,
  ``/api/chat``, ``/api/generate``, ``/api/embed`` (and the deprecated ``/api/embeddings``);
* NDJSON streaming by default, ``"stream": false`` for one object; the last
  line carries ``done_reason`` and the six count/duration fields (ns);
* ``format="json"`` and JSON-schema formats (a valid instance of the schema);
* the real error bodies and status codes (404 unknown model, 400 missing
  model or capability, 503 queue full, ``{"error": ...}`` mid-stream lines);
* ``keep_alive`` and ``/api/ps`` (loaded models), ``done_reason`` ``load`` / ``unload``.

Replies are scripted (``replies=[...]`` or a callable taking the request body)
or produced by a deterministic generator seeded from the prompt.  Token
counts follow :func:`count_tokens`.  Faults can be injected (refused
connections, 5xx errors, stalls, mid-stream errors), and :attr:`OllamaTestServer.stats`
records what the server saw, including the peak concurrency per model.

Examples
--------
>>> import ollama
>>> with OllamaTestServer(models=["m1"]) as server:          # doctest: +SKIP
...     reply = ollama.Client(host=server.url).chat(
...         model="m1", messages=[{"role": "user", "content": "hi"}])
"""

from __future__ import annotations

import logging

from obdask.llm.testing.models import BUSY_MESSAGE, ModelSpec, count_tokens
from obdask.llm.testing.models import MODEL_PATHS as MODEL_PATHS
from obdask.llm.testing.models import canonical_name as canonical_name
from obdask.llm.testing.models import parse_keep_alive as parse_keep_alive
from obdask.llm.testing.models import split_pieces as split_pieces
from obdask.llm.testing.server import OllamaTestServer
from obdask.llm.testing.server import ReplySource as ReplySource
from obdask.llm.testing.stats import ServerStats

logger = logging.getLogger(__name__)

__all__ = ["BUSY_MESSAGE", "ModelSpec", "OllamaTestServer", "ServerStats", "count_tokens"]
