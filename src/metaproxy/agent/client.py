"""A lean pooled HTTP/1.1 client for the agent's one upstream: TCP, TLS or a Unix socket.

`HttpPool.request(data, head=...)` writes one serialized request and returns the whole answer,
or raises UpstreamError with the status the instance should see: 503 when the server cannot be
reached (refused, missing, TLS handshake refused, connect timeout), 504 when it is slower than
the timeout, 502 for garbage or a close before the answer ended. A pooled connection that the
server closed while idle is retried once on a fresh one (nothing was received, so nothing was
processed twice). The agent's hot path: one asyncio Protocol, llhttp via httptools, no copies
beyond joining body chunks.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools

from metaproxy.errors import UpstreamError
from metaproxy.http.client import WaiterProtocol

MAX_ANSWER = 32 * 1024 * 1024
MAX_IDLE = 256


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class _Conn(WaiterProtocol):
    """One connection; one exchange at a time. httptools calls the on_* methods."""

    def __init__(self) -> None:
        super().__init__()
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.received = False
        self.done = False
        self.framed = False
        self.keep_alive = False
        self.head = False

    # -- exchange state ---------------------------------------------------------------------

    def begin(self, head: bool) -> asyncio.Future[None]:
        if self.received:  # every exchange starts on a fresh parser
            self.parser = httptools.HttpResponseParser(self)
        self.headers, self.chunks, self.size = [], [], 0
        self.received = self.done = self.framed = self.keep_alive = False
        self.head = head
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    # -- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.framed = any(
            k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers
        )
        if status < 200:
            raise UpstreamError(f"interim status {status} is not supported")
        if self.head or status in (204, 304):
            self.done = True
            self._wake(None)

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_ANSWER:
            raise UpstreamError(f"answer over {MAX_ANSWER} bytes")
        self.chunks.append(data)

    def on_message_complete(self) -> None:
        # llhttp resets its state once feed_data returns: ask about keep-alive now.
        self.keep_alive = self.parser.should_keep_alive()
        self.done = True
        self._wake(None)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.done:
            self._fail(UpstreamError("metadata server sent bytes nobody asked for"))
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, UpstreamError) else UpstreamError(str(exc)))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamError(f"metadata server answered garbage: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.done:
            if self.received and not self.framed and self.parser.get_status_code() >= 200:
                # RFC 9112 §6.3: no Content-Length or chunked framing → the close ends the body.
                self.done = True
                self._wake(None)
            else:
                self._wake(UpstreamError("metadata server closed the connection early"))

    def reusable(self) -> bool:
        return not self.closed and self.framed and not self.head and self.keep_alive


Connect = Callable[[Callable[[], _Conn]], Awaitable[tuple[asyncio.BaseTransport, _Conn]]]


class HttpPool:
    """Keep-alive connections to one server, at most `limit` of them at once."""

    def __init__(self, connect: Connect, *, limit: int, connect_timeout: float) -> None:
        self._connect_fn = connect
        self._connect_timeout = connect_timeout
        self._idle: list[_Conn] = []
        self._busy: set[_Conn] = set()
        self._slots = asyncio.Semaphore(limit)

    @classmethod
    def unix(cls, path: str, *, limit: int, connect_timeout: float) -> HttpPool:
        async def connect(factory: Callable[[], _Conn]) -> tuple[asyncio.BaseTransport, _Conn]:
            return await asyncio.get_running_loop().create_unix_connection(factory, path)

        return cls(connect, limit=limit, connect_timeout=connect_timeout)

    @classmethod
    def tcp(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        connect_timeout: float,
    ) -> HttpPool:
        async def connect(factory: Callable[[], _Conn]) -> tuple[asyncio.BaseTransport, _Conn]:
            return await asyncio.get_running_loop().create_connection(
                factory,
                host,
                port,
                ssl=ssl_context,
                server_hostname=host if ssl_context is not None else None,
                ssl_handshake_timeout=connect_timeout if ssl_context is not None else None,
            )

        return cls(connect, limit=limit, connect_timeout=connect_timeout)

    async def request(self, data: bytes, *, head: bool, timeout: float) -> Answer:
        """Send `data` (a whole serialized request) and read the whole answer."""
        try:
            # The wait for a free connection counts too: a saturated server is a slow one.
            async with asyncio.timeout(timeout), self._slots:
                return await self._request(data, head)
        except TimeoutError:
            # A connect timeout is already an UpstreamError(503): this is the answer's.
            raise UpstreamError("metadata server did not answer in time", status_hint=504) from None

    async def _request(self, data: bytes, head: bool) -> Answer:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, data, head)
            except UpstreamError:
                if conn.received:
                    raise
                # Closed while idle: nothing was read, so the server saw nothing. Once more.
        return await self._exchange(await self._new(), data, head)

    def _take_idle(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _new(self) -> _Conn:
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await self._connect_fn(_Conn)
        except TimeoutError:
            raise UpstreamError("metadata server: connect timed out", status_hint=503) from None
        except ssl.SSLError as exc:
            raise UpstreamError(
                f"metadata server: TLS handshake failed: {exc.reason or exc}", status_hint=503
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"metadata server unreachable: {exc.strerror or exc}", status_hint=503
            ) from None
        return conn

    async def _exchange(self, conn: _Conn, data: bytes, head: bool) -> Answer:
        waiter = conn.begin(head)
        self._busy.add(conn)
        try:
            if conn.closed or conn.transport is None:
                raise UpstreamError("connection closed")
            conn.transport.write(data)
            await waiter
        except BaseException:
            conn.close()
            raise
        finally:
            self._busy.discard(conn)
            conn.waiter = None
        answer = Answer(
            conn.parser.get_status_code(),
            conn.headers,
            conn.chunks[0] if len(conn.chunks) == 1 else b"".join(conn.chunks),
        )
        if conn.reusable() and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    async def close(self) -> None:
        """Close every connection, idle or busy (busy exchanges fail with 502)."""
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
