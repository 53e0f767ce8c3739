"""A Unix-socket HTTP backend that records every request it receives (test double for the agent).

Built on the standard library's http.server, deliberately independent of metaproxy's own parser.
"""

from __future__ import annotations

import http.server
import socketserver
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Recorded:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in arrival order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Recorder:
    path: Path
    requests: list[Recorded] = field(default_factory=list)
    status: int = 200
    body: bytes = b"recorded\n"
    echo: str | None = None  # when set, answer with this request header's value instead of body
    _server: Any = None
    _thread: threading.Thread | None = None

    def start(self) -> Recorder:
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append(
                    Recorded(
                        self.command,
                        self.path,
                        self.request_version,
                        list(self.headers.items()),
                        body,
                    )
                )
                answer = recorder.body
                if recorder.echo is not None:
                    answer = (self.headers.get(recorder.echo, "") + "\n").encode()
                self.send_response(recorder.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_OPTIONS = _handle
            do_PATCH = do_CONNECT = do_TRACE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return

            def address_string(self) -> str:
                return "unix"

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self._server = Server(str(self.path), Handler)
        self.path.chmod(0o666)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
