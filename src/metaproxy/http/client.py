"""Pooled keep-alive HTTP/1.1 connections to the agent's Unix socket.

`UpstreamPool.request(data, head=...)` sends one serialized request and returns the whole
response, or raises UpstreamError with the status an instance should see:
503 the socket is missing or refuses (at once), 504 slower than `timeouts.server`,
502 garbage or a close before the response ended. A failure never poisons the pool: the next
request opens a new connection, so serving resumes by itself when the agent is back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools

from metaproxy.errors import UpstreamError

log = logging.getLogger(__name__)

MAX_RESPONSE = 16 * 1024 * 1024
# Where a pool gets a connected socket when it does not connect to `path` itself (a front
# worker without access to the agent's socket file asks its manager for one).
Connector = Callable[[], Awaitable[socket.socket]]
# Idle connections kept per socket: a boot storm keeps hundreds of requests in flight, and
# closing most of them after a burst makes the next burst reconnect through the agent's accept.
MAX_IDLE = 1024


@dataclass(slots=True)
class Response:
    """A complete upstream response; `length` is upstream's Content-Length for HEAD."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    head_length: bytes | None = None


class _Exchange:
    """httptools callback target for one response on one connection."""

    __slots__ = (
        "chunks",
        "close_delimited",
        "done",
        "head",
        "head_length",
        "headers",
        "keep_alive",
        "parser",
        "received",
        "size",
    )

    def __init__(self, head: bool) -> None:
        self.head = head
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.received = False
        self.done = False
        self.close_delimited = False
        self.head_length: bytes | None = None
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # llhttp forgets keep-alive once the message completes: ask while it still knows.
        self.keep_alive = self.parser.should_keep_alive()
        status = self.parser.get_status_code()
        framed = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                framed, self.head_length = True, value
            elif lower == b"transfer-encoding":
                framed = True
        if self.head or status in (204, 304) or status < 200:
            self.done = True
        else:
            self.close_delimited = not framed

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_RESPONSE:
            raise UpstreamError("upstream response over 16 MiB", status_hint=502)
        self.chunks.append(data)

    def on_message_complete(self) -> None:
        self.done = True


class WaiterProtocol(asyncio.Protocol):
    """A client connection whose one pending exchange is awaited through `waiter`.

    Shared by the front's upstream pool and the agent's: `_wake` settles the waiter once (with
    the result or an UpstreamError), `_fail` settles it and drops the connection.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def _fail(self, error: UpstreamError) -> None:
        self._wake(error)
        self.close()

    def _wake(self, error: UpstreamError | None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Connection(WaiterProtocol):
    """One Unix-socket connection; carries one request at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        super().__init__()
        self.pool = pool
        self.exchange: _Exchange | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or exchange.done:
            self._fail(UpstreamError("upstream sent bytes nobody asked for", status_hint=502))
            return
        exchange.received = True
        try:
            exchange.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("upstream switched protocols", status_hint=502))
            return
        except httptools.HttpParserError as exc:
            # A callback's own error (the size cap) arrives as HttpParserCallbackError.
            self._fail(UpstreamError(f"upstream answered garbage: {exc}", status_hint=502))
            return
        if exchange.done:
            self._wake(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        exchange = self.exchange
        if exchange is not None and not exchange.done:
            if exchange.close_delimited:
                exchange.done = True
                self._wake(None)
            else:
                self._wake(UpstreamError("upstream closed before the response ended"))

    def expire(self) -> None:
        """The server timeout passed: 504 for the waiting request, and this connection ends."""
        self._fail(UpstreamError("agent did not answer in time", status_hint=504))


class UpstreamPool:
    """Keep-alive connections to one Unix socket, reused across every front that shares it."""

    def __init__(
        self,
        path: str,
        *,
        connect_timeout: float = 30.0,
        server_timeout: float = 32.0,
        connector: Connector | None = None,
    ) -> None:
        self.path = path
        self.connector = connector
        self.connect_timeout = connect_timeout
        self.server_timeout = server_timeout
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()

    async def request(
        self, data: bytes, *, head: bool = False, timeout: float | None = None
    ) -> Response:
        """Send one request and read its whole response (see the module docstring)."""
        limit = self.server_timeout if timeout is None else timeout
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, data, head, limit)
            except UpstreamError as exc:
                # A pooled connection the agent closed while idle fails before any byte comes
                # back; only then is it safe to try once more on a fresh connection.
                if exc.status_hint != 502 or conn.exchange is None or conn.exchange.received:
                    raise
        conn = await self._connect()
        return await self._exchange(conn, data, head, limit)

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.connector is not None:
                    sock = await self.connector()
                    _, conn = await loop.create_unix_connection(
                        lambda: _Connection(self), sock=sock
                    )
                else:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Connection(self), self.path
                    )
        except TimeoutError:
            raise UpstreamError("agent socket: connect timed out", status_hint=503) from None
        except OSError as exc:
            raise UpstreamError(
                f"agent socket {self.path}: {exc.strerror or exc}", status_hint=503
            ) from exc
        return conn

    async def _exchange(self, conn: _Connection, data: bytes, head: bool, limit: float) -> Response:
        exchange = conn.exchange = _Exchange(head)
        waiter = conn.waiter = asyncio.get_running_loop().create_future()
        self._busy.add(conn)
        ok = False
        try:
            if conn.transport is None or conn.closed:
                raise UpstreamError("agent connection closed", status_hint=502)
            conn.transport.write(data)
            # A bare TimerHandle: cheaper than asyncio.timeout() on every request.
            timer = asyncio.get_running_loop().call_later(limit, conn.expire)
            try:
                await waiter
            finally:
                timer.cancel()
            ok = True
        finally:
            self._busy.discard(conn)
            conn.waiter = None
            if not ok:
                conn.close()
        keep_alive = not conn.closed and not exchange.close_delimited and exchange.keep_alive
        if keep_alive and len(self._idle) < MAX_IDLE:
            conn.exchange = None
            self._idle.append(conn)
        else:
            conn.close()
        body = b"".join(exchange.chunks) if len(exchange.chunks) != 1 else exchange.chunks[0]
        return Response(
            status=exchange.parser.get_status_code(),
            headers=exchange.headers,
            body=body,
            keep_alive=keep_alive,
            head_length=exchange.head_length if head else None,
        )

    def _forget(self, conn: _Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    async def close(self) -> None:
        """Close every connection, idle or busy (busy ones fail with 502)."""
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
