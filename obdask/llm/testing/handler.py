"""HTTP plumbing of the Ollama test server: request handler, socket server, faults.

:class:`_Handler` parses requests and writes JSON / NDJSON responses; all
routing and model logic lives in :class:`~obdask.llm.testing.OllamaTestServer`.
"""

from __future__ import annotations

import http.server
import json
import logging
import select
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from obdask.llm.testing.models import MODEL_PATHS, ModelSpec

if TYPE_CHECKING:
    from obdask.llm.testing.server import OllamaTestServer

logger = logging.getLogger(__name__)


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
