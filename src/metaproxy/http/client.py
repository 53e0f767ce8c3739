"""Pooled keep-alive HTTP/1.1 connections to the agent's Unix socket.

`UpstreamPool.submit(data, sink, head=...)` sends one serialized request on a pooled connection
and, from that connection's `data_received`, calls `sink.upstream_response(...)` with the whole
response, or `sink.upstream_failed(error)` with an UpstreamError carrying the status an instance
should see: 503 the socket is missing or refuses (at once), 504 slower than `timeouts.server`,
502 garbage or a close before the response ended. No Task, Future or timer per request: the
server timeout is a deadline swept by a `Ticker`, and a Task runs only to open a connection.
`await UpstreamPool.request(...)` is the same as a coroutine, for callers that want one.

A failure never poisons the pool: the next request opens a new connection, so serving resumes
by itself when the agent is back. A pooled connection that fails before any byte of the
response came back (the agent closed it while idle) is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from metaproxy.errors import UpstreamError
from metaproxy.http.outbox import Outbox
from metaproxy.http.ticker import Ticker

log = logging.getLogger(__name__)

MAX_RESPONSE = 16 * 1024 * 1024
# Where a pool gets a connected socket when it does not connect to `path` itself (a front
# worker without access to the agent's socket file asks its manager for one).
Connector = Callable[[], Awaitable[socket.socket]]
# Idle connections kept per socket: a boot storm keeps hundreds of requests in flight, and
# closing most of them after a burst makes the next burst reconnect through the agent's accept.
MAX_IDLE = 1024
_NEVER = float("inf")


class Cancel(Protocol):
    def cancel(self) -> object: ...


class Sink(Protocol):
    """Who waits for one response; the pool calls exactly one of the two methods, once."""

    # Set by the pool while the request is in flight: cancel() abandons it (the connection
    # carrying it is closed, so the agent stops and no answer is left unread on it).
    upstream: Cancel | None

    def upstream_response(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        head_length: bytes | None,
        kept: bool,
    ) -> None:
        """The whole response; for HEAD, `head_length` is upstream's Content-Length (or None)."""

    def upstream_failed(self, error: UpstreamError) -> None: ...


@dataclass(slots=True)
class Response:
    """A complete upstream response; `head_length` is upstream's Content-Length for HEAD."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    head_length: bytes | None = None


class _Connection(asyncio.Protocol):
    """One Unix-socket connection carrying one request at a time; httptools calls on_*.

    The response parser lives as long as the connection: llhttp starts over by itself after a
    complete message on a keep-alive connection. Only an answer we stop reading early (HEAD,
    1xx) leaves it mid-message, and then it is replaced.
    """

    __slots__ = (
        "chunks",
        "clock",
        "closed",
        "data",
        "deadline",
        "done",
        "head",
        "headers",
        "keep_alive",
        "limit",
        "overrun",
        "parser",
        "pool",
        "received",
        "retry",
        "sink",
        "size",
        "status",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.clock = asyncio.get_running_loop().time
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.data = b""  # the request in flight, kept for the one retry
        self.head = False
        self.retry = False
        self.limit = 0.0
        self.deadline = _NEVER
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.status = 0
        self.received = False
        self.done = False
        self.overrun = False
        self.keep_alive = False

    # -- one exchange ------------------------------------------------------------------------

    def start(self, data: bytes, head: bool, sink: Sink, limit: float, retry: bool) -> None:
        """Send `data`; the answer, or the failure after `limit` s, goes to `sink`."""
        pool = self.pool
        self.sink = sink
        sink.upstream = self
        self.data = data
        self.head = head
        self.retry = retry
        self.limit = limit
        self.deadline = self.clock() + limit
        self.headers = []
        self.chunks = []
        self.size = 0
        self.received = self.done = self.overrun = False
        self.keep_alive = False
        self.status = 0
        pool._busy.add(self)
        if not pool._watched:
            pool._watch()
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            self._fail(UpstreamError("agent connection closed", status_hint=502))
            return
        pool.outbox.write(transport, data)

    def cancel(self) -> None:
        """The client went away: drop the exchange and the connection with it."""
        self.sink = None
        self.pool._busy.discard(self)
        self.close()

    def expire(self) -> None:
        """The server timeout passed: 504 for the waiting request, and this connection ends."""
        self._fail(UpstreamError("agent did not answer in time", status_hint=504))

    def _finish(self) -> None:
        """The response is complete: pool the connection, then hand the response over."""
        sink = self.sink
        self.sink = None
        self.data = b""
        self.deadline = _NEVER
        pool = self.pool
        pool._busy.discard(self)
        status = self.status
        if self.head or status < 200:
            # We stopped reading at the end of the head: llhttp still expects a body.
            self.parser = httptools.HttpResponseParser(self)
        kept = not self.closed and not self.overrun and self.keep_alive
        if kept and len(pool._idle) < MAX_IDLE:
            pool._idle.append(self)
        else:
            kept = False
            self.close()
        if sink is None:
            return
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        head_length = self._framing()[1] if self.head else None
        sink.upstream_response(status, self.headers, body, head_length, kept)

    def _fail(self, error: UpstreamError) -> None:
        sink = self.sink
        self.sink = None
        self.pool._busy.discard(self)
        self.deadline = _NEVER
        self.close()
        if sink is None:
            return
        if self.retry and not self.received and error.status_hint == 502:
            # Closed by the agent while idle: nothing came back, so nothing was processed.
            self.pool._open_then_start(self.data, self.head, sink, self.limit)
        else:
            sink.upstream_failed(error)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            # A second answer to one request: pass on the first, but never pool this one.
            self.overrun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.done:
            return
        # llhttp forgets keep-alive once the message completes: ask while it still knows.
        # It says no for a body that only the close can end (no Content-Length, not chunked),
        # so such a connection is never pooled.
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        status = self.status = parser.get_status_code()
        if self.head or status in (204, 304) or status < 200:
            self.done = True

    def _framing(self) -> tuple[bool, bytes | None]:
        """Whether the head said how the body ends, and its (last) Content-Length."""
        framed = False
        length = None
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                framed, length = True, value
            elif lower == b"transfer-encoding":
                framed = True
        return framed, length

    def on_body(self, data: bytes) -> None:
        if self.done:
            return  # a body after HEAD's head, or a second answer: not ours to relay
        self.size += len(data)
        if self.size > MAX_RESPONSE:
            raise UpstreamError("upstream response over 16 MiB", status_hint=502)
        self.chunks.append(data)

    def on_message_complete(self) -> None:
        self.done = True

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.sink is None or self.done:
            self._fail(UpstreamError("upstream sent bytes nobody asked for", status_hint=502))
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("upstream switched protocols", status_hint=502))
            return
        except httptools.HttpParserError as exc:
            # A callback's own error (the size cap) arrives as HttpParserCallbackError.
            self._fail(UpstreamError(f"upstream answered garbage: {exc}", status_hint=502))
            return
        if self.done:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.sink is not None and not self.done:
            if self.status >= 200 and not self._framing()[0]:
                # RFC 9112 §6.3: without Content-Length or chunked framing, the close ends it.
                self.done = True
                self._finish()
            else:
                self._fail(UpstreamError("upstream closed before the response ended"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Waiter:
    """A Sink that settles a Future: what `UpstreamPool.request` awaits."""

    __slots__ = ("future", "upstream")

    def __init__(self, future: asyncio.Future[Response]) -> None:
        self.future = future
        self.upstream: Cancel | None = None

    def upstream_response(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        head_length: bytes | None,
        kept: bool,
    ) -> None:
        self.upstream = None
        if not self.future.done():
            self.future.set_result(Response(status, headers, body, kept, head_length))

    def upstream_failed(self, error: UpstreamError) -> None:
        self.upstream = None
        if not self.future.done():
            self.future.set_exception(error)


class UpstreamPool:
    """Keep-alive connections to one Unix socket, reused across every front that shares it.

    `ticker`, `outbox`: the engine's deadline sweep and outbox (the pool makes its own when
    none is given).
    """

    def __init__(
        self,
        path: str,
        *,
        connect_timeout: float = 30.0,
        server_timeout: float = 32.0,
        connector: Connector | None = None,
        ticker: Ticker | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.path = path
        self.connector = connector
        self.connect_timeout = connect_timeout
        self.server_timeout = server_timeout
        self.ticker = ticker if ticker is not None else Ticker()
        self.outbox = outbox if outbox is not None else Outbox()
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._opening: set[asyncio.Task[None]] = set()
        self._watched = False
        self._shortest = server_timeout

    def submit(
        self, data: bytes, sink: Sink, *, head: bool = False, timeout: float | None = None
    ) -> None:
        """Send one request; its outcome goes to `sink` (see the module docstring).

        `timeout`: this request's server timeout instead of the pool's.
        """
        if timeout is None:
            limit = self.server_timeout
        else:
            limit = timeout
            if timeout < self._shortest:
                self._shortest = timeout
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.start(data, head, sink, limit, True)
                return
        self._open_then_start(data, head, sink, limit)

    async def request(
        self, data: bytes, *, head: bool = False, timeout: float | None = None
    ) -> Response:
        """Send one request and read its whole response (see the module docstring)."""
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        self.submit(data, waiter, head=head, timeout=timeout)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            upstream = waiter.upstream
            if upstream is not None:
                waiter.upstream = None
                upstream.cancel()
            raise

    def _open_then_start(self, data: bytes, head: bool, sink: Sink, limit: float) -> None:
        """Open a new connection (a Task: only when the pool has no idle one), then send.

        The server timeout starts once connected, as the connect timeout is separate.
        """
        task = asyncio.get_running_loop().create_task(self._open(data, head, sink, limit))
        sink.upstream = task
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, data: bytes, head: bool, sink: Sink, limit: float) -> None:
        try:
            conn = await self._connect()
        except UpstreamError as exc:
            sink.upstream = None
            sink.upstream_failed(exc)
            return
        except asyncio.CancelledError:
            # An abandoning sink clears `upstream` before it cancels; anyone else (close())
            # leaves a sink waiting, which must hear of it.
            if sink.upstream is not None:
                sink.upstream = None
                sink.upstream_failed(UpstreamError("agent pool closed", status_hint=502))
            raise
        conn.start(data, head, sink, limit, False)

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

    def _watch(self) -> None:
        self._watched = True
        self.ticker.watch(self, self._shortest)

    def sweep(self, now: float) -> bool:
        """The ticker's call: 504 for every request past its deadline."""
        due = [conn for conn in self._busy if conn.deadline <= now]
        for conn in due:
            conn.expire()
        self._watched = bool(self._busy)
        return self._watched

    def _forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    async def close(self) -> None:
        """Close every connection, idle or busy (busy ones fail with 502)."""
        for task in list(self._opening):
            task.cancel()
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
