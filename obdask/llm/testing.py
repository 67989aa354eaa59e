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

import hashlib
import http.server
import json
import logging
import math
import re
import select
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from obdask.llm.schema import example_instance

logger = logging.getLogger(__name__)

__all__ = ["BUSY_MESSAGE", "ModelSpec", "OllamaTestServer", "ServerStats", "count_tokens"]

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
MODEL_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s])")
_VOCAB = (
    "the model reads code and writes a small patch to fix one failing test then runs "
    "the suite again checks lint adds docs keeps names clear splits long functions and "
    "reports what changed why it matters which files moved how tests pass"
).split()
_FOREVER = float("inf")


def count_tokens(text: str) -> int:
    """Count tokens the way the test server does: words and punctuation marks.

    Parameters
    ----------
    text : str
        Any text.

    Returns
    -------
    int
        ``len(re.findall(r"\\w+|[^\\w\\s]", text))``.
    """
    return len(_TOKEN_RE.findall(text or ""))


def split_pieces(text: str) -> list[str]:
    """Split ``text`` into the fragments the server streams (one token each, whitespace kept)."""
    pieces = _PIECE_RE.findall(text)
    tail = text[len("".join(pieces)) :]
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces = [tail]
    return pieces


def canonical_name(name: str) -> str:
    """Return ``name`` with the default ``:latest`` tag added when it has no tag."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def _full_name(name: str) -> str:
    base = canonical_name(name)
    parts = base.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return "/".join(parts)


def _rfc3339(ts: float | None = None) -> str:
    dt = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, default: float) -> float:
    """Parse an Ollama ``keep_alive`` (seconds or Go duration) into seconds; <0 is forever."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, (int, float)):
        return _FOREVER if value < 0 else float(value)
    text = str(value).strip()
    sign = -1.0 if text.startswith("-") else 1.0
    parts = re.findall(r"([0-9.]+)(ns|us|µs|ms|s|m|h)", text.lstrip("+-"))
    if not parts or "".join(n + u for n, u in parts) != text.lstrip("+-"):
        raise ValueError(f'time: missing unit in duration "{text}"')
    seconds = sign * sum(float(n) * _GO_UNITS[u] for n, u in parts)
    return _FOREVER if seconds < 0 else seconds


@dataclass
class ModelSpec:
    """One model the test server pretends to have installed.

    Parameters
    ----------
    name : str
        ``name[:tag]``; ``:latest`` is added when no tag is given.
    capabilities : tuple of str
        Subset of ``completion, tools, insert, vision, embedding, thinking``.
    size : int
        Bytes reported by ``/api/tags`` and ``/api/ps``.
    parallel : int, optional
        Requests served at once (``OLLAMA_NUM_PARALLEL``); None uses the server default.
    family, parameter_size, quantization_level : str
        Reported in ``details``.
    context_length, embedding_length : int
        Reported in ``model_info``; ``embedding_length`` is the embedding dimension.
    size_vram : int, optional
        Bytes on GPU reported by ``/api/ps``; None means all of ``size``.
    """

    name: str
    capabilities: tuple[str, ...] = ("completion", "tools")
    size: int = 2_019_393_189
    parallel: int | None = None
    family: str = "llama"
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    context_length: int = 4096
    embedding_length: int = 16
    size_vram: int | None = None

    def __post_init__(self) -> None:
        self.name = canonical_name(self.name)
        self.capabilities = tuple(self.capabilities)

    @property
    def digest(self) -> str:
        """Deterministic sha256 hex digest derived from the name."""
        return hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        """The ``details`` object shared by tags, ps and show."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


def _as_spec(model: str | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return ModelSpec(model)
    return ModelSpec(**dict(model))


class ServerStats:
    """Thread-safe record of what an :class:`OllamaTestServer` saw.

    Attributes
    ----------
    requests : collections.Counter
        ``(path, model)`` -> number of requests (model is None for paths without one).
    statuses : collections.Counter
        ``(path, status)`` -> number of responses (``-1`` for a mid-stream error).
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
            self._in_flight: Counter = getattr(self, "_in_flight", Counter())
            self._running: Counter = getattr(self, "_running", Counter())
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


@dataclass
class _Fault:
    kind: str  # "error" | "stall" | "midstream"
    status: int = 500
    message: str = "llama runner process has terminated: exit status 2"
    seconds: float = 0.0
    after_tokens: int = 1
    paths: tuple[str, ...] = MODEL_PATHS


class _Aborted(Exception):
    """The server is closing or refusing connections: drop this request."""


@dataclass
class _Reply:
    pieces: list[str]
    done_reason: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Per-connection request handler; all logic lives in :class:`OllamaTestServer`."""

    protocol_version = "HTTP/1.1"
    server_version = "ollama-test"
    route = "/"

    @property
    def app(self) -> OllamaTestServer:
        return self.server.app  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        self.app._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.app._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802
        self.app._dispatch(self, "GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self.app._dispatch(self, "HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self.app._dispatch(self, "POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self.app._dispatch(self, "DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self.app._dispatch(self, "PUT")

    # -- body and responses --------------------------------------------------
    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_bytes(self, status: int, body: bytes, ctype: str) -> None:
        self.app.stats._status(self.route, status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_bytes(status, body, "application/json; charset=utf-8")

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message})

    def send_text(self, status: int, text: str) -> None:
        self.send_bytes(status, text.encode(), "text/plain; charset=utf-8")

    def start_stream(self) -> None:
        self.app.stats._status(self.route, 200)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_line(self, obj: Any) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: OllamaTestServer) -> None:
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("ollama test server: error on %s", client_address, exc_info=True)


ReplySource = Callable[[dict[str, Any]], Any] | Iterable[Any] | None


class OllamaTestServer:
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
            if fresh:
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

    # -- listing endpoints ---------------------------------------------------
    def _tags(self, h: _Handler, body: dict[str, Any]) -> None:
        models = [
            {
                "name": s.name,
                "model": s.name,
                "modified_at": _rfc3339(),
                "size": s.size,
                "digest": s.digest,
                "details": s.details(),
            }
            for s in self._models.values()
        ]
        h.send_json(200, {"models": models})

    def _show(self, h: _Handler, body: dict[str, Any]) -> None:
        name = body.get("model") or body.get("name") or ""
        if not name:
            return h.send_error_json(400, "model is required")
        spec = self._lookup(name)
        if spec is None:
            return h.send_error_json(404, f"model '{name}' not found")
        arch = spec.family
        h.send_json(
            200,
            {
                "modelfile": f"# Modelfile generated by the obdask test server\nFROM {spec.name}\n",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": spec.details(),
                "model_info": {
                    "general.architecture": arch,
                    "general.basename": spec.name.split(":")[0],
                    "general.parameter_count": _parameter_count(spec.parameter_size),
                    f"{arch}.context_length": spec.context_length,
                    f"{arch}.embedding_length": spec.embedding_length,
                },
                "capabilities": list(spec.capabilities),
                "modified_at": _rfc3339(),
            },
        )

    # -- chat / generate -----------------------------------------------------
    def _capability_error(
        self, spec: ModelSpec, name: str, body: dict[str, Any], chat: bool
    ) -> str:
        caps = set(spec.capabilities)
        if "completion" not in caps:
            return f"{json.dumps(name)} does not support {'chat' if chat else 'generate'}"
        if chat:
            images = any((m or {}).get("images") for m in body.get("messages") or [])
        else:
            images = bool(body.get("images"))
        if body.get("tools") and "tools" not in caps:
            return f"{_full_name(name)} does not support tools"
        if images and "vision" not in caps:
            return f"{_full_name(name)} does not support vision"
        if not chat and body.get("suffix") and "insert" not in caps:
            return f"{_full_name(name)} does not support insert"
        if body.get("think") and "thinking" not in caps:
            return f"{json.dumps(name)} does not support thinking"
        return ""

    def _completion(self, h: _Handler, body: dict[str, Any]) -> None:
        chat = h.route == "/api/chat"
        name = body.get("model") or ""
        if not name:
            if chat:
                return h.send_error_json(400, "model is required")
            return h.send_error_json(404, "model '' not found")
        spec = self._lookup(name)
        if spec is None:
            return h.send_error_json(404, f"model '{name}' not found")
        error = self._capability_error(spec, name, body, chat)
        if error:
            return h.send_error_json(400, error)
        try:
            keep = parse_keep_alive(body.get("keep_alive"), self.keep_alive)
        except ValueError as exc:
            return h.send_error_json(400, str(exc))
        empty = not body.get("messages") if chat else not (body.get("prompt") or body.get("images"))
        if empty:
            return self._load_or_unload(h, spec, name, keep, chat)
        fault = self._take_fault(h.route)
        if fault is not None and fault.kind == "error":
            return h.send_error_json(fault.status, fault.message)
        t0 = time.perf_counter_ns()
        epoch = self._epoch
        if not self._admit(spec, epoch):
            return h.send_error_json(503, BUSY_MESSAGE)
        done = _Done(self, spec)
        try:
            self._load(spec, keep, body.get("options"))
            if fault is not None and fault.kind == "stall":
                self._sleep(fault.seconds, epoch)
            ctx = {"name": name, "spec": spec, "chat": chat, "epoch": epoch, "t0": t0, "done": done}
            ctx["t_load"] = time.perf_counter_ns()
            ctx["reply"] = self._make_reply(spec, body, chat)
            ctx["prompt_eval_count"] = max(1, count_tokens(_prompt_text(body, chat)))
            midstream = fault if fault is not None and fault.kind == "midstream" else None
            if body.get("stream", True) is False:
                self._send_whole(h, ctx, midstream)
            else:
                self._send_stream(h, ctx, midstream)
        finally:
            done()
            self._touch(spec, keep)

    def _load_or_unload(
        self, h: _Handler, spec: ModelSpec, name: str, keep: float, chat: bool
    ) -> None:
        if keep == 0:
            with self._lock:
                self._loaded.pop(spec.name, None)
            reason = "unload"
        else:
            self._load(spec, keep, None)
            self._touch(spec, keep)
            reason = "load"
        out: dict[str, Any] = {"model": name, "created_at": _rfc3339()}
        if chat:
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        out.update(done=True, done_reason=reason)
        h.send_json(200, out)

    def _make_reply(self, spec: ModelSpec, body: dict[str, Any], chat: bool) -> _Reply:
        text: Any = None
        if self._reply_fn is not None:
            text = self._reply_fn(body)
        else:
            with self._lock:
                if self._replies:
                    text = self._replies.popleft()
        tool_calls: list[dict[str, Any]] = []
        if isinstance(text, Mapping):
            tool_calls = list(text.get("tool_calls") or [])
            text = text.get("content", "")
        if text is None:
            text = self._default_text(spec, body, chat)
        options = body.get("options") or {}
        reason = "stop"
        stops = options.get("stop") or []
        for stop in [stops] if isinstance(stops, str) else stops:
            if stop and stop in text:
                text = text[: text.index(stop)]
        pieces = split_pieces(str(text))
        limit = options.get("num_predict")
        if isinstance(limit, int) and limit >= 0 and len(pieces) > limit:
            pieces, reason = pieces[:limit], "length"
        return _Reply(pieces, reason, tool_calls)

    def _default_text(self, spec: ModelSpec, body: dict[str, Any], chat: bool) -> str:
        seed = (body.get("options") or {}).get("seed")
        digest = _hash_bytes(f"{spec.name}\0{seed}\0{_prompt_text(body, chat)}", 64)
        lo, hi = self.reply_tokens
        n = lo + digest[0] % (max(hi, lo) - lo + 1)
        words = [_VOCAB[b % len(_VOCAB)] for b in digest[1 : 1 + n]]
        sentence = " ".join(words)
        fmt = body.get("format")
        if fmt == "json":
            return json.dumps({"response": sentence})
        if isinstance(fmt, dict):
            return json.dumps(example_instance(fmt))
        return sentence[:1].upper() + sentence[1:] + "."

    def _chunk(self, ctx: dict[str, Any], piece: str, done: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"model": ctx["name"], "created_at": _rfc3339()}
        if ctx["chat"]:
            out["message"] = {"role": "assistant", "content": piece}
        else:
            out["response"] = piece
        out["done"] = done
        return out

    def _final(self, ctx: dict[str, Any], piece: str, eval_count: int, t_first: int) -> dict:
        reply: _Reply = ctx["reply"]
        out = self._chunk(ctx, piece, True)
        now = time.perf_counter_ns()
        out["done_reason"] = reply.done_reason
        if not ctx["chat"]:
            out["context"] = list(range(1, ctx["prompt_eval_count"] + eval_count + 1))
        out.update(
            total_duration=max(1, now - ctx["t0"]),
            load_duration=max(1, ctx["t_load"] - ctx["t0"]),
            prompt_eval_count=ctx["prompt_eval_count"],
            prompt_eval_duration=max(1, t_first - ctx["t_load"]),
            eval_count=eval_count,
            eval_duration=max(1, now - t_first),
        )
        return out

    def _record(self, ctx: dict[str, Any], final: dict[str, Any], stream: bool, path: str) -> None:
        self.stats._call(
            {
                "path": path,
                "model": ctx["spec"].name,
                "prompt_eval_count": final["prompt_eval_count"],
                "eval_count": final.get("eval_count", 0),
                "done_reason": final.get("done_reason"),
                "total_duration": final["total_duration"],
                "stream": stream,
                "ts": time.time(),
            }
        )

    def _send_stream(self, h: _Handler, ctx: dict[str, Any], fault: _Fault | None) -> None:
        reply: _Reply = ctx["reply"]
        epoch = ctx["epoch"]
        h.start_stream()
        self._sleep(self.first_token_latency, epoch)
        t_first = time.perf_counter_ns()
        if reply.tool_calls and ctx["chat"]:
            line = self._chunk(ctx, "", False)
            line["message"]["tool_calls"] = reply.tool_calls
            h.write_line(line)
        for i, piece in enumerate(reply.pieces):
            if fault is not None and i >= fault.after_tokens:
                break
            self._sleep(self.token_latency, epoch)
            h.write_line(self._chunk(ctx, piece, False))
        if fault is not None:
            self.stats._status(h.route, -1)
            ctx["done"]()
            h.write_line({"error": fault.message})
            return h.end_stream()
        final = self._final(ctx, "", len(reply.pieces), t_first)
        self._record(ctx, final, True, h.route)
        ctx["done"]()  # before the client can see the end, so peaks are exact
        h.write_line(final)
        h.end_stream()

    def _send_whole(self, h: _Handler, ctx: dict[str, Any], fault: _Fault | None) -> None:
        reply: _Reply = ctx["reply"]
        self._sleep(self.first_token_latency, ctx["epoch"])
        t_first = time.perf_counter_ns()
        if fault is not None:
            ctx["done"]()
            return h.send_error_json(500, fault.message)
        self._sleep(self.token_latency * len(reply.pieces), ctx["epoch"])
        final = self._final(ctx, "".join(reply.pieces), len(reply.pieces), t_first)
        if reply.tool_calls and ctx["chat"]:
            final["message"]["tool_calls"] = reply.tool_calls
        self._record(ctx, final, False, h.route)
        ctx["done"]()
        h.send_json(200, final)

    # -- embeddings ----------------------------------------------------------
    def _embed(self, h: _Handler, body: dict[str, Any]) -> None:
        legacy = h.route == "/api/embeddings"
        name = body.get("model") or ""
        spec = self._lookup(name) if name else None
        if spec is None:
            return h.send_error_json(404, f"model '{name}' not found")
        raw = body.get("prompt") if legacy else body.get("input")
        texts = [] if raw is None else [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return h.send_error_json(400, "invalid input type")
        try:
            keep = parse_keep_alive(body.get("keep_alive"), self.keep_alive)
        except ValueError as exc:
            return h.send_error_json(400, str(exc))
        fault = self._take_fault(h.route)
        if fault is not None and fault.kind == "error":
            return h.send_error_json(fault.status, fault.message)
        t0, epoch = time.perf_counter_ns(), self._epoch
        if not self._admit(spec, epoch):
            return h.send_error_json(503, BUSY_MESSAGE)
        done = _Done(self, spec)
        try:
            self._load(spec, keep, body.get("options"))
            t_load = time.perf_counter_ns()
            if fault is not None and fault.kind == "stall":
                self._sleep(fault.seconds, epoch)
            self._sleep(self.first_token_latency, epoch)
            dims = body.get("dimensions") or spec.embedding_length
            vectors = [_embedding(spec.name, t, spec.embedding_length, dims) for t in texts]
            count = sum(count_tokens(t) for t in texts)
            now = time.perf_counter_ns()
            if legacy:
                done()
                return h.send_json(200, {"embedding": vectors[0] if vectors else []})
            out = {
                "model": name,
                "embeddings": vectors,
                "total_duration": max(1, now - t0),
                "load_duration": max(1, t_load - t0),
                "prompt_eval_count": count,
            }
            self.stats._call(
                {
                    **out,
                    "path": h.route,
                    "model": spec.name,
                    "eval_count": 0,
                    "done_reason": None,
                    "stream": False,
                    "ts": time.time(),
                    "embeddings": len(vectors),
                }
            )
            done()
            h.send_json(200, out)
        finally:
            done()
            self._touch(spec, keep)


class _Done:
    """Releases a request's parallel slot exactly once (before its last bytes go out)."""

    def __init__(self, server: OllamaTestServer, spec: ModelSpec) -> None:
        self._server = server
        self._spec = spec
        self._pending = True

    def __call__(self) -> None:
        if self._pending:
            self._pending = False
            self._server._release(self._spec)


def _peer_closed(conn: socket.socket) -> bool:
    """True if the client closed its end (Ollama cancels such requests)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    if chat:
        return "\n".join(str((m or {}).get("content") or "") for m in body.get("messages") or [])
    parts = [body.get("system") or "", body.get("prompt") or "", body.get("suffix") or ""]
    return "\n".join(p for p in parts if p)


def _hash_bytes(seed: str, n: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{counter}\0{seed}".encode()).digest()
        counter += 1
    return out[:n]


def _embedding(model: str, text: str, length: int, dims: int) -> list[float]:
    raw = _hash_bytes(f"{model}\0{text}", max(1, length))
    vec = [(b - 127.5) / 127.5 for b in raw][: max(1, min(int(dims), length))]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _parameter_count(parameter_size: str) -> int:
    match = re.fullmatch(r"([0-9.]+)\s*([KMBT]?)", parameter_size.strip().upper())
    if not match:
        return 0
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(2)]
    return int(float(match.group(1)) * scale)
