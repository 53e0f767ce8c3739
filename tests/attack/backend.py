"""A raw-bytes upstream for the attack suite: records exactly what a front sends the agent.

Unlike tests/support/recorder.py (stdlib http.server, lenient), this backend keeps the raw
bytes of every upstream request and parses them with its own strict reader, noting every
deviation instead of repairing it. A front that desynchronises (forwards a smuggled request,
a chunk trailer, a folded header) shows up here as an extra request or a listed problem.

It can also misbehave on purpose, to play a broken agent: slow, garbage, closing mid-response,
closing at once, or never answering (see `Mode`).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Mode = Literal["ok", "slow", "garbage", "close-mid", "close", "hang"]

MAX_HEAD = 64 * 1024
TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
REQUEST_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) (HTTP/\d\.\d)$")
BODY_MARK = b"upstream-ok\n"


@dataclass
class Upstream:
    """One request as the front sent it, with every framing problem the strict reader saw."""

    raw_head: bytes
    method: str = ""
    target: str = ""
    version: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunked: bool = False
    complete: bool = False
    problems: list[str] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in arrival order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Incomplete(Exception):
    """More bytes are needed to finish the current request."""


def _parse_head(raw: bytes, up: Upstream) -> None:
    lines = raw.split(b"\r\n")
    for line in lines:
        if b"\n" in line or b"\r" in line:
            up.problems.append("bare CR or LF in the head")
            break
    match = REQUEST_LINE.match(lines[0])
    if not match:
        up.problems.append(f"malformed request line {lines[0][:80]!r}")
        parts = lines[0].split(b" ")
        up.method = parts[0].decode("latin-1")
        up.target = parts[1].decode("latin-1") if len(parts) > 1 else ""
    else:
        up.method, up.target, up.version = (g.decode("latin-1") for g in match.groups())
    for line in lines[1:]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            up.problems.append("obs-fold continuation line")
            continue
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.match(name):
            up.problems.append(f"malformed header line {line[:80]!r}")
            continue
        value = value.strip(b" \t")
        if any((b < 0x20 and b != 0x09) or b == 0x7F for b in value):
            up.problems.append(f"control byte in header {name.decode()!r}")
        up.headers.append((name.decode("latin-1"), value.decode("latin-1")))


def _read_chunked(buf: bytes, start: int, up: Upstream) -> int:
    """Decode a chunked body from buf[start:]; return the end offset (raise _Incomplete)."""
    pos, body = start, bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise _Incomplete
        size_text = buf[pos:eol].split(b";", 1)[0]
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size_text):
            up.problems.append(f"bad chunk size {size_text[:40]!r}")
            return len(buf)
        size = int(size_text, 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                raise _Incomplete
            if end > pos - 2:
                up.problems.append("chunked trailer fields forwarded")
            up.body = bytes(body)
            return end + 4
        if len(buf) < pos + size + 2:
            raise _Incomplete
        body += buf[pos : pos + size]
        if buf[pos + size : pos + size + 2] != b"\r\n":
            up.problems.append("chunk data not followed by CRLF")
        pos += size + 2


def parse_one(buf: bytes) -> tuple[Upstream, int]:
    """Parse one request from the start of buf: (request, bytes used); raise _Incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            up = Upstream(raw_head=buf[:MAX_HEAD], problems=["head over 64 KiB"])
            return up, len(buf)
        raise _Incomplete
    up = Upstream(raw_head=buf[:end])
    _parse_head(buf[:end], up)
    lengths = up.values("Content-Length")
    encodings = up.values("Transfer-Encoding")
    if lengths and encodings:
        up.problems.append("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        up.problems.append("several Content-Length fields")
    start = end + 4
    if encodings:
        up.chunked = True
        if [e.lower() for e in encodings] != ["chunked"]:
            up.problems.append(f"Transfer-Encoding {encodings!r}")
        used = _read_chunked(buf, start, up)
    elif lengths:
        if not lengths[0].isdigit():
            up.problems.append(f"Content-Length {lengths[0]!r}")
            return up, len(buf)
        size = int(lengths[0])
        if len(buf) < start + size:
            raise _Incomplete
        up.body = buf[start : start + size]
        used = start + size
    else:
        used = start
    up.complete = True
    return up, used


@dataclass
class RawBackend:
    """Listen on a Unix socket; record each request; answer as `mode` says."""

    path: Path
    mode: Mode = "ok"
    delay: float = 0.0
    requests: list[Upstream] = field(default_factory=list)
    leftovers: list[bytes] = field(default_factory=list)
    connections: int = 0
    active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> RawBackend:
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        self.path.chmod(0o666)
        sock.listen(512)
        sock.settimeout(0.2)
        self._sock = sock
        self._stop.clear()
        threading.Thread(target=self._accept_loop, args=(sock,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and remove the socket (open connections die with their threads)."""
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.path.unlink(missing_ok=True)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.leftovers.clear()
        self.mode, self.delay = "ok", 0.0

    def snapshot(self) -> tuple[list[Upstream], list[bytes]]:
        with self._lock:
            return list(self.requests), list(self.leftovers)

    def settle(self, timeout: float = 2.0) -> None:
        """Wait until no connection is mid-request (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.active:
            time.sleep(0.005)

    def __enter__(self) -> RawBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.5)
        with conn:
            while not self._stop.is_set():
                try:
                    up, used = parse_one(buf)
                except _Incomplete:
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    if not buf:
                        self._busy(1)
                    buf += data
                    continue
                buf = buf[used:]
                with self._lock:
                    self.requests.append(up)
                try:
                    keep = self._answer(conn, up)
                except OSError:
                    keep = False
                if not buf:
                    self._busy(-1)
                if not keep or not up.complete:
                    break
            if buf:
                self._busy(-1)
                with self._lock:
                    self.leftovers.append(buf)

    def _busy(self, delta: int) -> None:
        with self._lock:
            self.active += delta

    def _answer(self, conn: socket.socket, up: Upstream) -> bool:
        mode = self.mode
        if mode == "hang":
            self._stop.wait(self.delay or 30.0)
            return False
        if mode == "close":
            return False
        if mode == "slow":
            self._stop.wait(self.delay)
        if mode == "garbage":
            conn.sendall(b"\x16\x03\x01 this is not HTTP at all\r\n\r\n")
            return False
        # The body names the request it answers, so a response given to the wrong client shows.
        full = BODY_MARK + up.target.encode("latin-1", "replace")[:200] + b"\n"
        body = b"" if up.method == "HEAD" else full
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(full)}\r\n\r\n"
        ).encode()
        if mode == "close-mid":
            conn.sendall(head + body[:3])
            return False
        conn.sendall(head + body)
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(socket.socket(family)) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
