"""A raw-bytes HTTP client: send exactly these bytes, read back whatever responses come.

It never normalises anything on the way out (that is the point), and reads responses with a
small parser of its own so a refusal, a pipelined answer and a silent close are told apart.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field

STATUS_LINE = re.compile(rb"^HTTP/(\d)\.(\d) (\d{3})(?: [^\r\n]*)?$")


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


@dataclass
class Exchange:
    """What came back for one send: final responses, 1xx interims, and how it ended."""

    responses: list[Response] = field(default_factory=list)
    interim: list[int] = field(default_factory=list)
    closed: bool = False
    timed_out: bool = False
    garbage: bytes = b""
    elapsed: float = 0.0

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


class _More(Exception):
    pass


def _parse_response(buf: bytes, head_only: bool, closed: bool) -> tuple[Response, int]:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        raise _More
    lines = buf[:end].split(b"\r\n")
    match = STATUS_LINE.match(lines[0])
    if not match:
        raise ValueError(lines[0][:80])
    status = int(match.group(3))
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1").strip(), value.decode("latin-1").strip()))
    resp = Response(status, headers, b"")
    start = end + 4
    if head_only or status < 200 or status in (204, 304):
        return resp, start
    length = resp.header("Content-Length")
    if resp.header("Transfer-Encoding"):
        pos = start
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                raise _More
            size = int(buf[pos:eol].split(b";")[0], 16)
            if size == 0:
                fin = buf.find(b"\r\n", eol + 2)
                if fin < 0:
                    raise _More
                return resp, fin + 2
            if len(buf) < eol + 2 + size + 2:
                raise _More
            resp.body += buf[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
    if length is not None:
        if len(buf) < start + int(length):
            raise _More
        resp.body = buf[start : start + int(length)]
        return resp, start + int(length)
    if not closed:
        raise _More
    resp.body = buf[start:]
    return resp, len(buf)


def exchange(
    addr: tuple[str, int],
    data: bytes | list[bytes],
    *,
    expect: int = 1,
    timeout: float = 3.0,
    head_only: bool = False,
    gap: float = 0.0,
    sock: socket.socket | None = None,
) -> Exchange:
    """Send `data` (pieces `gap` seconds apart), read until `expect` final responses or close."""
    result = Exchange()
    started = time.monotonic()
    own = sock is None
    conn = sock or socket.create_connection(addr, timeout=timeout)
    try:
        pieces = data if isinstance(data, list) else [data]
        for i, piece in enumerate(pieces):
            if i and gap:
                time.sleep(gap)
            try:
                conn.sendall(piece)
            except OSError:
                break
        _read(conn, result, expect, timeout, head_only)
    finally:
        if own:
            conn.close()
    result.elapsed = time.monotonic() - started
    return result


def _read(
    conn: socket.socket, result: Exchange, expect: int, timeout: float, head_only: bool
) -> None:
    buf = b""
    deadline = time.monotonic() + timeout
    while len(result.responses) < expect:
        while buf:
            try:
                resp, used = _parse_response(buf, head_only, result.closed)
            except _More:
                break
            except ValueError:
                result.garbage, buf = buf, b""
                return
            buf = buf[used:]
            if 100 <= resp.status < 200:
                result.interim.append(resp.status)
            else:
                result.responses.append(resp)
        if len(result.responses) >= expect or result.closed:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            result.timed_out = True
            break
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            result.timed_out = True
            break
        except OSError:
            chunk = b""
        if not chunk:
            result.closed = True
            if not buf:
                break
            continue
        buf += chunk
    if buf and not result.garbage and len(result.responses) < expect:
        result.garbage = buf
