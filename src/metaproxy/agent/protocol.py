"""The agent's HTTP/1.1 shell on its Unix socket: llhttp (httptools) parses, a handler answers.

Each connection reads whole requests — the head up to the blank line within `max_head` bytes
and `MAX_HEADERS` fields (else 431), then the body by Content-Length or chunks within
`max_body` (else 413) — and answers them strictly in order, so pipelining is safe. No policy
lives here: the handler decides; this layer only moves bytes and enforces sizes and idleness.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import httptools

from metaproxy.agent.upstream import Reply, generic_body

log = logging.getLogger(__name__)

MAX_HEADERS = 100
IDLE_TIMEOUT = 60.0
MAX_PENDING = 16  # pipelined requests queued before we stop reading


@dataclass(frozen=True, slots=True)
class Request:
    """One whole request as the front sent it (header names in their original case)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def getall(self, name: str) -> list[str]:
        """Every value of header `name`, compared case-insensitively."""
        lower = name.lower()
        return [v for k, v in self.headers if k.lower() == lower]


Handler = Callable[[Request], Awaitable[Reply]]


class _Refuse(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Item:
    request: Request | None  # None: answer `status` and close (a refused request)
    keep_alive: bool
    status: int = 400


class AgentProtocol(asyncio.Protocol):
    """One connection from a front."""

    def __init__(
        self,
        handler: Handler,
        connections: set[AgentProtocol],
        *,
        max_head: int,
        max_body: int,
    ) -> None:
        self._handler = handler
        self._connections = connections
        self._max_head = max_head
        self._max_body = max_body
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._pending: collections.deque[_Item] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._broken = False
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0

    @property
    def busy(self) -> bool:
        return self._task is not None or bool(self._pending)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None:
            self._task.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self._arm()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            cause = exc.__context__
            status = cause.status if isinstance(cause, _Refuse) else 400
            if not isinstance(cause, _Refuse):
                log.warning("refusing a malformed request from a front: %s", exc)
            self._broken = True
            self._enqueue(_Item(None, keep_alive=False, status=status))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))
        self._count(len(name) + len(value) + 4)
        if len(self._headers) > MAX_HEADERS:
            raise _Refuse(431)

    def on_headers_complete(self) -> None:
        expect = False
        for name, value in self._headers:
            lower = name.lower()
            if lower == "content-length" and value.isdigit():
                if int(value) > self._max_body:
                    raise _Refuse(413)
            elif lower == "expect" and value.strip().lower() == "100-continue":
                expect = True
        # RFC 9110 §10.1.1: a client that sent Expect waits for 100 before its body; answer it
        # when nothing else is owed on this connection (an interim answer must not overtake).
        if expect and not self.busy and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._max_body:
            raise _Refuse(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = Request(
            self._parser.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            self._headers,
            b"".join(self._body),
        )
        self._enqueue(_Item(request, keep_alive=self._parser.should_keep_alive()))

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._max_head:
            raise _Refuse(431)

    # -- answering, in order ----------------------------------------------------------------

    def _enqueue(self, item: _Item) -> None:
        self._pending.append(item)
        if len(self._pending) >= MAX_PENDING and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._answer_all())

    async def _answer_all(self) -> None:
        try:
            while self._pending and self._transport is not None:
                item = self._pending.popleft()
                if self._paused and len(self._pending) < MAX_PENDING // 2:
                    self._transport.resume_reading()
                    self._paused = False
                if item.request is None:
                    reply = Reply(item.status, generic_body(item.status))
                else:
                    reply = await self._handler(item.request)
                self._write(reply, item)
                if not item.keep_alive:
                    self._pending.clear()
                    self.close()
        finally:
            self._task = None
            self._arm()

    def _write(self, reply: Reply, item: _Item) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        head = [_status_line(reply.status), b"Server: metaproxy"]
        head += [f"{k}: {v}".encode("latin-1") for k, v in reply.headers]
        if not any(k.lower() == "content-type" for k, _ in reply.headers):
            head.append(b"Content-Type: text/plain")
        head.append(b"Content-Length: %d" % len(reply.body))
        if not item.keep_alive:
            head.append(b"Connection: close")
        head_only = item.request is not None and item.request.method == "HEAD"
        data = b"\r\n".join(head) + b"\r\n\r\n"
        transport.write(data if head_only else data + reply.body)

    def _arm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._transport is not None and not self.busy:
            self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.close)


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}".encode("ascii")
    return line
