"""Thread-safe record of the requests an Ollama test server saw (:class:`ServerStats`)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from obdask.llm.testing.models import canonical_name

logger = logging.getLogger(__name__)


class ServerStats:
    """Thread-safe record of what an :class:`OllamaTestServer` saw.

    Attributes
    ----------
    requests : collections.Counter
        ``(path, model)`` -> number of requests (model is None for paths without one).
    statuses : collections.Counter
        ``(path, status)`` -> number of responses (``-1`` for a mid-stream error).
    authorizations : collections.Counter
        ``Authorization`` header value (None when absent) -> number of requests.
    calls : list of dict
        One dict per finished generation/embedding with the counts the server
        reported: ``path, model, prompt_eval_count, eval_count, done_reason,
        total_duration, stream, ts``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far (current concurrency is kept)."""
        with self._lock:
            self.requests: Counter = Counter()
            self.statuses: Counter = Counter()
            self.calls: list[dict[str, Any]] = []
            # Authorization header values received (None: none), counted per value
            self.authorizations: Counter = Counter()
            self._in_flight: Counter = Counter(getattr(self, "_in_flight", ()))  # kept
            self._running: Counter = Counter(getattr(self, "_running", ()))
            self._peak: Counter = Counter(self._in_flight)
            self._peak_running: Counter = Counter(self._running)

    def total(self, path: str | None = None, model: str | None = None) -> int:
        """Number of requests, optionally only for one path and/or model."""
        model = canonical_name(model) if model else None
        with self._lock:
            return sum(
                n
                for (p, m), n in self.requests.items()
                if (path is None or p == path) and (model is None or m == model)
            )

    def concurrency(self, model: str) -> int:
        """Requests for ``model`` admitted now (running or queued for a slot)."""
        with self._lock:
            return self._in_flight[canonical_name(model)]

    def peak(self, model: str | None = None) -> int:
        """Highest number of requests for ``model`` admitted at once (max over models if None)."""
        with self._lock:
            if model is None:
                return max(self._peak.values(), default=0)
            return self._peak[canonical_name(model)]

    def peak_running(self, model: str | None = None) -> int:
        """Highest number of requests for ``model`` holding a parallel slot at once."""
        with self._lock:
            if model is None:
                return max(self._peak_running.values(), default=0)
            return self._peak_running[canonical_name(model)]

    def tokens(self, model: str | None = None) -> tuple[int, int]:
        """Sum of ``(prompt_eval_count, eval_count)`` over recorded calls."""
        calls = self.calls_for(model)
        return (
            sum(c["prompt_eval_count"] for c in calls),
            sum(c["eval_count"] for c in calls),
        )

    def calls_for(self, model: str | None = None) -> list[dict[str, Any]]:
        """Copy of :attr:`calls`, optionally only for one model."""
        model = canonical_name(model) if model else None
        with self._lock:
            return [dict(c) for c in self.calls if model is None or c["model"] == model]

    # -- used by the server ------------------------------------------------
    def _request(self, path: str, model: str | None) -> None:
        with self._lock:
            self.requests[(path, model)] += 1

    def _authorization(self, value: str | None) -> None:
        with self._lock:
            self.authorizations[value] += 1

    def _status(self, path: str, status: int) -> None:
        with self._lock:
            self.statuses[(path, status)] += 1

    def _call(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append(record)

    def _enter(self, model: str, running: bool) -> None:
        with self._lock:
            self._in_flight[model] += 1
            self._peak[model] = max(self._peak[model], self._in_flight[model])
            if running:
                self._run(model)

    def _run(self, model: str) -> None:
        self._running[model] += 1
        self._peak_running[model] = max(self._peak_running[model], self._running[model])

    def _start_running(self, model: str) -> None:
        with self._lock:
            self._run(model)

    def _leave(self, model: str, running: bool) -> None:
        with self._lock:
            self._in_flight[model] -= 1
            if running:
                self._running[model] -= 1
