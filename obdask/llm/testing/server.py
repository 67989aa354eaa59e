"""The Ollama test server itself: lifecycle, configuration, faults, slots, keep-alive.

See :mod:`obdask.llm.testing` for what the server implements.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from obdask.llm.testing.endpoints import _EndpointsMixin
from obdask.llm.testing.handler import _Aborted, _Fault, _Handler, _HTTPServer, _peer_closed
from obdask.llm.testing.models import (
    _FOREVER,
    MODEL_PATHS,
    ModelSpec,
    _as_spec,
    _rfc3339,
    canonical_name,
    parse_keep_alive,
)
from obdask.llm.testing.stats import ServerStats

logger = logging.getLogger(__name__)

ReplySource = Callable[[dict[str, Any]], Any] | Iterable[Any] | None


class OllamaTestServer(_EndpointsMixin):
    """A loopback HTTP server that behaves like ``ollama serve`` for tests.

    Parameters
    ----------
    models : iterable of str, dict or ModelSpec
        Installed models; a dict holds :class:`ModelSpec` fields.
    host : str
        Interface to bind (loopback by default).
    port : int
        Port to bind; 0 picks a free one (kept across :meth:`stop`/:meth:`start`).
    num_parallel : int
        Default parallel slots per model (``OLLAMA_NUM_PARALLEL``).
    max_queue : int
        Requests that may wait for a slot, all models together (``OLLAMA_MAX_QUEUE``);
        beyond ``slots + max_queue`` the server answers 503 with :data:`BUSY_MESSAGE`.
    token_latency : float
        Seconds before each generated token.
    first_token_latency : float
        Extra seconds before the first token (prompt evaluation).
    replies : list or callable, optional
        Scripted replies.  A list is consumed in order, then the default
        generator takes over; a callable gets the request body and returns the
        text (``None`` means "use the default").  A reply may also be a dict
        ``{"content": str, "tool_calls": [...]}``.
    reply_tokens : tuple of int
        Length range of default replies, in tokens.
    keep_alive : str or float
        Default ``keep_alive`` (``OLLAMA_KEEP_ALIVE``).
    version : str
        Returned by ``/api/version``.
    """

    def __init__(
        self,
        models: Iterable[str | Mapping[str, Any] | ModelSpec] = ("m1",),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        num_parallel: int = 1,
        max_queue: int = 512,
        token_latency: float = 0.0,
        first_token_latency: float = 0.0,
        replies: ReplySource = None,
        reply_tokens: tuple[int, int] = (8, 24),
        keep_alive: str | float = "5m",
        version: str = "0.12.6",
    ) -> None:
        self._models: dict[str, ModelSpec] = {}
        for m in models:
            self.add_model(m)
        self._bind_host = host
        self._port = port
        self.num_parallel = num_parallel
        self.max_queue = max_queue
        self.token_latency = token_latency
        self.first_token_latency = first_token_latency
        self.reply_tokens = reply_tokens
        self.keep_alive = parse_keep_alive(keep_alive, 300.0)
        self.version = version
        self.stats = ServerStats()
        self._reply_fn: Callable[[dict[str, Any]], Any] | None = None
        self._replies: deque[Any] = deque()
        if callable(replies):
            self._reply_fn = replies
        elif replies is not None:
            self._replies.extend(replies)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._slots: Counter = Counter()
        self._waiting = 0
        self._faults: deque[_Fault] = deque()
        self._loaded: dict[str, dict[str, Any]] = {}
        self._conns: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._epoch = 0
        self._tls = threading.local()

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> OllamaTestServer:
        """Start listening (again, on the same port after :meth:`stop`); returns ``self``."""
        with self._lock:
            if self._httpd is not None:
                return self
            httpd = _HTTPServer((self._bind_host, self._port), self)
            self._port = httpd.server_address[1]
            self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ollama-test-{self._port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("ollama test server listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections (in-flight streams break)."""
        with self._cond:
            httpd, self._httpd = self._httpd, None
            self._epoch += 1
            conns = list(self._conns)
            self._cond.notify_all()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def refuse_connections(self) -> None:
        """Fault: close the listening socket (clients get connection refused); port is kept."""
        self.stop()

    def accept_connections(self) -> None:
        """Undo :meth:`refuse_connections`: listen again on the same port."""
        self.start()

    @property
    def running(self) -> bool:
        """True while the server accepts connections."""
        return self._httpd is not None

    def __enter__(self) -> OllamaTestServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port (known once started, kept while stopped)."""
        return self._port

    @property
    def host(self) -> str:
        """``"127.0.0.1:PORT"``: a value for ``OLLAMA_HOST`` or ``Client(host=...)``."""
        return f"{self._bind_host}:{self._port}"

    @property
    def url(self) -> str:
        """``"http://127.0.0.1:PORT"``."""
        return f"http://{self.host}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<OllamaTestServer {self.url} {state} models={sorted(self._models)}>"

    # -- configuration and faults -------------------------------------------
    def add_model(self, model: str | Mapping[str, Any] | ModelSpec) -> ModelSpec:
        """Install (or replace) a model; returns its :class:`ModelSpec`."""
        spec = _as_spec(model)
        self._models[spec.name] = spec
        return spec

    def remove_model(self, name: str) -> None:
        """Uninstall a model (later requests get 404)."""
        self._models.pop(canonical_name(name), None)
        self._loaded.pop(canonical_name(name), None)

    @property
    def models(self) -> dict[str, ModelSpec]:
        """Installed models by canonical name."""
        return dict(self._models)

    def script(self, *replies: Any) -> None:
        """Queue scripted replies (used in order before the default generator)."""
        with self._lock:
            self._replies.extend(replies)

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 500,
        message: str = "llama runner process has terminated: exit status 2",
        paths: Iterable[str] = MODEL_PATHS,
    ) -> None:
        """Fault: answer the next ``n`` model requests with ``status`` and an error body."""
        self._add_faults(n, _Fault("error", status=status, message=message, paths=tuple(paths)))

    def stall(self, seconds: float, n: int = 1, *, paths: Iterable[str] = MODEL_PATHS) -> None:
        """Fault: the next ``n`` model requests hold a slot ``seconds`` before replying."""
        self._add_faults(n, _Fault("stall", seconds=seconds, paths=tuple(paths)))

    def fail_mid_stream(
        self,
        n: int = 1,
        *,
        after_tokens: int = 1,
        message: str = "an error was encountered while running the model: unexpected EOF",
    ) -> None:
        """Fault: the next ``n`` generations send ``after_tokens`` tokens, then an error line.

        A ``"stream": false`` request gets a 500 with the same message instead.
        """
        fault = _Fault("midstream", message=message, after_tokens=after_tokens)
        self._add_faults(n, fault, paths=("/api/chat", "/api/generate"))

    def clear_faults(self) -> None:
        """Drop all pending injected faults."""
        with self._lock:
            self._faults.clear()

    def _add_faults(self, n: int, fault: _Fault, paths: tuple[str, ...] | None = None) -> None:
        if paths is not None:
            fault.paths = paths
        with self._lock:
            self._faults.extend(_Fault(**vars(fault)) for _ in range(n))

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if path in fault.paths:
                    del self._faults[i]
                    return fault
        return None

    def loaded_models(self) -> list[str]:
        """Names of the models ``/api/ps`` would list now."""
        return [m["name"] for m in self._ps()["models"]]

    # -- plumbing -------------------------------------------------------------
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _routes(self) -> dict[tuple[str, str], Callable[[_Handler, dict[str, Any]], None]]:
        return {
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
            ("GET", "/api/version"): self._version,
            ("HEAD", "/api/version"): self._version,
            ("GET", "/api/tags"): self._tags,
            ("HEAD", "/api/tags"): self._tags,
            ("GET", "/api/ps"): lambda h, body: h.send_json(200, self._ps()),
            ("POST", "/api/show"): self._show,
            ("POST", "/api/chat"): self._completion,
            ("POST", "/api/generate"): self._completion,
            ("POST", "/api/embed"): self._embed,
            ("POST", "/api/embeddings"): self._embed,
        }

    def _dispatch(self, h: _Handler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        h.route = path
        self._tls.conn = h.connection
        self.stats._authorization(h.headers.get("Authorization"))
        routes = self._routes()
        try:
            raw = h.read_body()
            handler = routes.get((method, path))
            if handler is None:
                self.stats._request(path, None)
                if any(p == path for _, p in routes):
                    return h.send_text(405, "405 method not allowed")
                return h.send_text(404, "404 page not found")
            body: dict[str, Any] = {}
            if method == "POST":
                if not raw.strip():
                    self.stats._request(path, None)
                    return h.send_error_json(400, "missing request body")
                try:
                    body = json.loads(raw)
                    if not isinstance(body, dict):
                        raise ValueError("cannot unmarshal into a request object")
                except ValueError as exc:
                    self.stats._request(path, None)
                    return h.send_error_json(400, str(exc))
            model = body.get("model") or body.get("name")
            self.stats._request(path, canonical_name(model) if isinstance(model, str) else None)
            handler(h, body)
        except (_Aborted, OSError):
            logger.debug("ollama test server %s: dropped %s %s", self.url, method, path)
            h.close_connection = True

    def _root(self, h: _Handler, body: dict[str, Any]) -> None:
        h.send_text(200, "Ollama is running")

    def _version(self, h: _Handler, body: dict[str, Any]) -> None:
        h.send_json(200, {"version": self.version})

    def _lookup(self, name: str) -> ModelSpec | None:
        return self._models.get(canonical_name(name))

    def _sleep(self, seconds: float, epoch: int) -> None:
        """Sleep, but raise :class:`_Aborted` as soon as the server stops or the client leaves."""
        end = time.monotonic() + max(0.0, seconds)
        conn = getattr(self._tls, "conn", None)
        while True:
            if self._epoch != epoch or (conn is not None and _peer_closed(conn)):
                raise _Aborted()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.02))

    def _admit(self, spec: ModelSpec, epoch: int) -> bool:
        """Take a parallel slot for ``spec``, queueing if allowed; False means 503."""
        parallel = max(1, spec.parallel or self.num_parallel)
        with self._cond:
            if self._slots[spec.name] < parallel:
                self._slots[spec.name] += 1
                self.stats._enter(spec.name, running=True)
                return True
            if self._waiting >= self.max_queue:
                return False
            self._waiting += 1
            self.stats._enter(spec.name, running=False)
            try:
                while self._slots[spec.name] >= parallel:
                    if self._epoch != epoch:
                        self.stats._leave(spec.name, running=False)
                        raise _Aborted()
                    self._cond.wait(0.05)
            finally:
                self._waiting -= 1
            self._slots[spec.name] += 1
            self.stats._start_running(spec.name)
            return True

    def _release(self, spec: ModelSpec) -> None:
        with self._cond:
            self._slots[spec.name] -= 1
            self.stats._leave(spec.name, running=True)
            self._cond.notify_all()

    # -- loaded models (keep_alive, /api/ps) ---------------------------------
    def _load(self, spec: ModelSpec, keep: float, options: Any) -> bool:
        """Mark ``spec`` loaded while a request runs; True if it was not loaded before."""
        now = time.time()
        with self._lock:
            entry = self._loaded.get(spec.name)
            fresh = entry is None or entry["expires"] <= now
            num_ctx = (options or {}).get("num_ctx") if isinstance(options, dict) else None
            if entry is None or fresh:
                entry = {"context_length": int(num_ctx or spec.context_length), "keep": keep}
                self._loaded[spec.name] = entry
            entry["expires"] = _FOREVER
            entry["keep"] = keep
            return fresh

    def _touch(self, spec: ModelSpec, keep: float) -> None:
        """Restart the keep-alive timer of ``spec`` after a request (0 unloads it)."""
        with self._lock:
            if self._slots[spec.name] > 0 and keep != 0:
                return
            if keep == 0:
                self._loaded.pop(spec.name, None)
            elif spec.name in self._loaded:
                self._loaded[spec.name]["expires"] = time.time() + keep

    def _ps(self) -> dict[str, Any]:
        now = time.time()
        rows = []
        with self._lock:
            for name, entry in list(self._loaded.items()):
                spec = self._models.get(name)
                if spec is None or entry["expires"] <= now:
                    self._loaded.pop(name, None)
                    continue
                expires = entry["expires"]
                ts = now + 290 * 365 * 86400 if math.isinf(expires) else expires
                rows.append((expires, self._ps_row(spec, ts, entry["context_length"])))
        rows.sort(key=lambda r: -r[0])
        return {"models": [r[1] for r in rows]}

    @staticmethod
    def _ps_row(spec: ModelSpec, expires: float, context_length: int) -> dict[str, Any]:
        return {
            "name": spec.name,
            "model": spec.name,
            "size": spec.size,
            "digest": spec.digest,
            "details": spec.details(),
            "expires_at": _rfc3339(expires),
            "size_vram": spec.size if spec.size_vram is None else spec.size_vram,
            "context_length": context_length,
        }
