"""Pooled keep-alive HTTP/1.1 connections to the agent's Unix socket, pipelined when verified.

`UpstreamPool.submit(fields, body, sink, head=..., pipelined=...)` sends one request (its
serialized fields, then the body) on a pooled connection and, from that connection's
`data_received`, calls `sink.upstream_response(...)` with the whole response, or
`sink.upstream_failed(error)` with an UpstreamError carrying the status an instance should see:
503 the socket is missing or refuses (at once), 504 slower than `timeouts.server`, 502 garbage
or a close before the response ended.
No Task, Future or timer per request: the server timeout is a deadline swept by a `Ticker`, and
a Task runs only to open a connection. `await UpstreamPool.request(...)` is the same as a
coroutine, for callers that want one.

Pipelining (`depth` > 1). Answers to pipelined requests come back in order (RFC 9112 §9.3.2),
so an answer is matched to its request by position alone; one answer out of place would hand
an instance another instance's metadata. So position is not trusted on its own: every request
carries `X-Metaproxy-Seq: N` (unique in the pool), and metaproxy's agent echoes it in its
answer. A connection carries more than one request only after it has echoed correctly, and on
such a connection every answer must carry the number of the request at the head of its queue.
An answer that is missing its number or carries another, an interim (1xx) answer, more answers
than requests, or garbage ends the connection: the request being answered gets 502, and none
of that connection's answers after it is relayed. An upstream that does not echo (Neutron's
agent) is never pipelined, so pipelining costs it nothing and cannot mismatch. Only GETs are
pipelined (HEAD and requests with a body go alone on a connection), and what one loop round
queues for a connection goes out in one write (`Outbox`).

A failure never poisons the pool: the next request opens a new connection, so serving resumes
by itself when the agent is back. A request that received no byte of its answer when its
connection ended (the agent closed a pooled connection while idle, an answer said
`Connection: close`, or the answer ahead of it failed) is sent once more on another connection;
only GETs can wait behind another request, and the one at the head of a fresh connection is not
retried (its failure is the agent's, not staleness).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from metaproxy.errors import UpstreamError
from metaproxy.http import sequence
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
_HEAD_END = b"\r\n\r\n"


class Cancel(Protocol):
    def cancel(self) -> object: ...


class Sink(Protocol):
    """Who waits for one response; the pool calls exactly one of the two methods, once."""

    # Set by the pool while the request is in flight: cancel() abandons it (its answer is
    # dropped when it comes; a connection carrying nothing else is closed, so the agent stops).
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


class _Exchange:
    """One request: its bytes (kept for the one retry), deadline, and who waits for it.

    `head`: the request is HEAD (its answer has no body, whatever its fields say).
    """

    __slots__ = (
        "body",
        "conn",
        "deadline",
        "fields",
        "head",
        "limit",
        "pipelined",
        "retried",
        "seq",
        "sink",
    )

    def __init__(
        self,
        fields: bytes,
        body: bytes,
        sink: Sink,
        head: bool,
        pipelined: bool,
        limit: float,
        now: float,
    ) -> None:
        self.fields = fields  # request line and fields, without the blank line
        self.body = body
        self.limit = limit
        self.sink: Sink | None = sink
        self.head = head
        self.pipelined = pipelined  # may share a connection with other requests in flight
        self.deadline = now + limit
        self.retried = False
        self.seq = b""  # set when written, as the ASCII digits the answer must echo
        self.conn: _Connection | None = None

    def cancel(self) -> None:
        """The client went away: its answer is dropped; a connection carrying only this
        request is closed, so the agent stops working on it."""
        self.sink = None
        conn = self.conn
        if conn is not None and len(conn.queue) == 1 and conn.queue[0] is self:
            conn.pool._busy.discard(conn)
            conn.close()

    def tell(self, error: UpstreamError) -> None:
        sink = self.sink
        self.sink = None
        self.conn = None
        if sink is not None:
            sink.upstream = None
            sink.upstream_failed(error)


# An answer parsed during one feed, delivered after it: (exchange, status, headers, body,
# HEAD's Content-Length, keep-alive).
_Ready = tuple[_Exchange, int, list[tuple[bytes, bytes]], bytes, bytes | None, bool]


class _Connection(asyncio.Protocol):
    """One Unix-socket connection: requests in flight in order, answered in order.

    httptools calls on_*; the response parser lives as long as the connection (llhttp starts
    over by itself after each complete message). Answers completed while it parses one read
    are delivered after the read, so a sink may submit again from its callback.
    """

    __slots__ = (
        "chunks",
        "closed",
        "discard",
        "echo",
        "echoes",
        "ending",
        "exclusive",
        "headers",
        "keep_alive",
        "parser",
        "pool",
        "queue",
        "ready",
        "received",
        "size",
        "transport",
        "used",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self.queue: collections.deque[_Exchange] = collections.deque()
        self.ready: list[_Ready] = []
        self.echoes = False  # has echoed a request's number: may carry pipelined requests
        self.exclusive = False  # carrying a request that must be alone (HEAD, a body)
        self.ending = False  # an answer said close, or was HEAD's: nothing more is read
        self.discard = False  # after HEAD's head: llhttp's idea of its body is not ours
        self.used = 0  # answers completed on this connection
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.received = False  # any byte of the answer to queue[0]
        self.echo: bytes | None = None
        self.keep_alive = False

    # -- the pool's side ---------------------------------------------------------------------

    def takes(self, depth: int) -> bool:
        """May a pipelined GET queue here now?"""
        return (
            self.echoes
            and not self.exclusive
            and not self.ending
            and len(self.queue) < depth
            and self.usable()
        )

    def usable(self) -> bool:
        """Open, and not on its way out (a failed write closes the transport at once, and
        connection_lost follows later)."""
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def send(self, exchange: _Exchange) -> None:
        """Number `exchange`, queue it and write it (with the rest of this loop round's).

        On a connection that turns out to be going, nothing of it is written: it goes to
        another one, without using up its retry.
        """
        pool = self.pool
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            if pool._current is self:
                pool._current = None
            exchange.conn = None
            pool._place(exchange)
            return
        exchange.conn = self
        sink = exchange.sink
        if sink is not None:
            sink.upstream = exchange
        queue = self.queue
        if not queue:
            pool._busy.add(self)
            if not pool._watched:
                pool._watch()
        queue.append(exchange)
        if not exchange.pipelined:
            self.exclusive = True
        pool.seq += 1
        seq = exchange.seq = b"%d" % pool.seq
        pool.outbox.write(
            transport, b"%s%s\r\n%s" % (exchange.fields, sequence.line(seq), exchange.body)
        )

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.queue:
            raise UpstreamError("upstream sent an answer nobody asked for", status_hint=502)
        self.received = True
        self.discard = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if sequence.is_field(name):
            if self.echo is not None:
                raise UpstreamError("answer with two sequence numbers", status_hint=502)
            self.echo = value

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            # We never send Expect or Upgrade: an interim answer is not one we asked for.
            raise UpstreamError(f"upstream sent interim status {status}", status_hint=502)
        exchange = self.queue[0]
        wrong = sequence.mismatch(
            self.echo, exchange.seq, shared=self.echoes or len(self.queue) > 1
        )
        if wrong is not None:
            raise UpstreamError(wrong, status_hint=502)
        if self.echo is not None:
            self.echoes = True
        # llhttp forgets keep-alive once the message completes: ask while it still knows. It
        # says no for a body that only the close can end (no Content-Length, not chunked).
        self.keep_alive = parser.should_keep_alive()
        if exchange.head:
            # llhttp does not know the request was HEAD and would wait for a body: the answer
            # ends here, and the connection is not used again.
            self.keep_alive = False
            self._complete(status)
            self.discard = True

    def on_body(self, data: bytes) -> None:
        if self.discard:
            return
        self.size += len(data)
        if self.size > MAX_RESPONSE:
            raise UpstreamError("upstream response over 16 MiB", status_hint=502)
        self.chunks.append(data)

    def on_message_complete(self) -> None:
        if self.discard:
            return
        self._complete(self.parser.get_status_code())

    def _complete(self, status: int) -> None:
        exchange = self.queue.popleft()
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        headers = self.headers
        head_length = _framing(headers)[1] if exchange.head else None
        keep = self.keep_alive
        self.used += 1
        self._reset()
        if not keep:
            self.ending = True
        self.ready.append((exchange, status, headers, body, head_length, keep))

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.queue or self.ending:
            self._fail(UpstreamError("upstream sent bytes nobody asked for", status_hint=502))
            return
        error = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            error = cause if isinstance(cause, UpstreamError) else UpstreamError(str(exc))
        except httptools.HttpParserUpgrade:
            error = UpstreamError("upstream switched protocols", status_hint=502)
        except httptools.HttpParserError as exc:
            error = UpstreamError(f"upstream answered garbage: {exc}", status_hint=502)
        if self.ready:
            self._deliver()
        if error is not None:
            self._fail(error)
        elif self.ending:
            # RFC 9112 §9.6: after an answer that says close, nothing more was processed.
            self._end(
                UpstreamError("upstream closed the connection", status_hint=502),
                head=False,
                announced=True,
            )
        elif not self.queue:
            self.pool._released(self)

    def _deliver(self) -> None:
        """Hand over the answers completed by the last read, in order."""
        ready = self.ready
        self.ready = []
        for exchange, status, headers, body, head_length, keep in ready:
            sink = exchange.sink
            exchange.sink = None
            exchange.conn = None
            if sink is not None:
                sink.upstream = None
                sink.upstream_response(status, headers, body, head_length, keep)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        queue = self.queue
        if queue and self.received and not self.discard and not _framing(self.headers)[0]:
            status = self.parser.get_status_code()
            if status >= 200:
                # RFC 9112 §6.3: without Content-Length or chunked framing, the close ends it.
                self.keep_alive = False
                self._complete(status)
                self._deliver()
        self._end(
            UpstreamError("upstream closed before the response ended", status_hint=502), head=True
        )

    # -- endings -----------------------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        """A bad answer: the request it was for gets `error`; none of this connection's
        answers after it is read, and the requests behind it go elsewhere (see `_end`)."""
        log.warning("agent connection: %s", error)
        self.close()  # first: a sink told below may submit again, and must not come here
        if self.queue:
            self.queue.popleft().tell(error)
        self._end(error, head=False)

    def _end(self, error: UpstreamError, *, head: bool, announced: bool = False) -> None:
        """Close; requests still queued that received nothing go once more on another
        connection, the rest get `error`.

        `head`: the first queued request may have been (partly) answered; it is not retried
        if it received a byte, or if this connection never answered (a fresh connection's
        failure is the agent's, not staleness). No request goes twice, or a broken agent would
        make it loop, except after `announced`: the agent said close in an answer, so it
        processed nothing after it (RFC 9112 §9.6); those go again without using up their
        retry, and as each round answers at least one request, this ends.
        """
        self.close()
        pool = self.pool
        pool._forget(self)
        queue, self.queue = self.queue, collections.deque()
        first = head
        for exchange in queue:
            if exchange.sink is None:
                pass
            elif (exchange.retried and not announced) or (
                first and (self.received or self.used == 0)
            ):
                exchange.tell(error)
            else:
                if not announced:
                    exchange.retried = True
                exchange.conn = None
                pool._place(exchange)
            first = False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[bool, bytes | None]:
    """Whether the head said how the body ends, and its (last) Content-Length."""
    framed = False
    length = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            framed, length = True, value
        elif lower == b"transfer-encoding":
            framed = True
    return framed, length


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

    `depth`: GETs in flight at once on one connection that echoes (1: never pipeline).
    `ticker`, `outbox`: the engine's deadline sweep and outbox (the pool makes its own when
    none is given).
    """

    def __init__(
        self,
        path: str,
        *,
        connect_timeout: float = 30.0,
        server_timeout: float = 32.0,
        depth: int = 1,
        connector: Connector | None = None,
        ticker: Ticker | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.path = path
        self.connector = connector
        self.connect_timeout = connect_timeout
        self.server_timeout = server_timeout
        self.depth = depth
        self.ticker = ticker if ticker is not None else Ticker()
        self.outbox = outbox if outbox is not None else Outbox()
        self.seq = 0
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._current: _Connection | None = None  # where pipelined GETs queue while it has room
        self._opening: set[asyncio.Task[None]] = set()
        self._watched = False
        self._shortest = server_timeout
        self._clock: Callable[[], float] | None = None  # the running loop's, once known

    def submit(
        self,
        fields: bytes,
        body: bytes,
        sink: Sink,
        *,
        head: bool = False,
        timeout: float | None = None,
        pipelined: bool = False,
    ) -> None:
        """Send one request; its outcome goes to `sink` (see the module docstring).

        `fields`: the request line and fields, each ending in CRLF, without the blank line
        (the pool adds its sequence field, the blank line, then `body`). `head`: a HEAD
        request. `pipelined`: it may share a connection (a GET without a body). `timeout`:
        this request's server timeout instead of the pool's.
        """
        if timeout is None:
            limit = self.server_timeout
        else:
            limit = timeout
            if timeout < self._shortest:
                self._shortest = timeout
        clock = self._clock
        if clock is None:
            clock = self._clock = asyncio.get_running_loop().time
        self._place(
            _Exchange(fields, body, sink, head, pipelined and self.depth > 1, limit, clock())
        )

    async def request(
        self,
        data: bytes,
        *,
        head: bool = False,
        timeout: float | None = None,
        pipelined: bool = False,
    ) -> Response:
        """Send one whole serialized request and read its whole response (see the module
        docstring)."""
        cut = data.find(_HEAD_END)
        if cut < 0:
            raise ValueError("a request ends its head with a blank line")
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        self.submit(
            data[: cut + 2],
            data[cut + 4 :],
            waiter,
            head=head,
            timeout=timeout,
            pipelined=pipelined,
        )
        try:
            return await waiter.future
        except asyncio.CancelledError:
            upstream = waiter.upstream
            if upstream is not None:
                waiter.upstream = None
                upstream.cancel()
            raise

    def _place(self, exchange: _Exchange) -> None:
        """Behind others on the current shared connection, alone on an idle one, or on a new
        one."""
        if exchange.pipelined:
            conn = self._current
            depth = self.depth
            if conn is None or not conn.takes(depth):
                conn = None
                for busy in self._busy:
                    if busy.takes(depth):
                        conn = self._current = busy
                        break
            if conn is not None:
                conn.send(exchange)
                return
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable():
                if exchange.pipelined and conn.echoes:
                    self._current = conn
                conn.send(exchange)
                return
        self._open_then_send(exchange)

    def _released(self, conn: _Connection) -> None:
        """`conn` answered everything in flight: keep it for the next request (or close it)."""
        self._busy.discard(conn)
        conn.exclusive = False
        if self._current is conn:
            # An idle connection is taken from `_idle` only: never from two places at once.
            self._current = None
        if len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            self._forget(conn)
            conn.close()

    def _open_then_send(self, exchange: _Exchange) -> None:
        """Open a new connection (a Task: only when the pool has no idle one), then send.

        The server timeout starts once connected (the connect timeout is separate).
        """
        task = asyncio.get_running_loop().create_task(self._open(exchange))
        sink = exchange.sink
        if sink is not None:
            sink.upstream = task
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, exchange: _Exchange) -> None:
        try:
            conn = await self._connect()
        except UpstreamError as exc:
            exchange.tell(exc)
            return
        except asyncio.CancelledError:
            # An abandoning sink clears `upstream` before it cancels; anyone else (close())
            # leaves a sink waiting, which must hear of it.
            sink = exchange.sink
            if sink is not None and sink.upstream is not None:
                exchange.tell(UpstreamError("agent pool closed", status_hint=502))
            raise
        if exchange.sink is None:
            conn.close()  # abandoned while connecting
            return
        # The server timeout starts once connected, as the connect timeout is separate.
        exchange.deadline = asyncio.get_running_loop().time() + exchange.limit
        conn.send(exchange)

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
        """The ticker's call: 504 for every request past its deadline; the connection that
        carried it ends (its late answer would come first), and the rest go elsewhere."""
        for conn in [c for c in self._busy if any(e.deadline <= now for e in c.queue)]:
            conn.close()  # first: a sink told below may submit again, and must not come here
            late = [e for e in conn.queue if e.deadline <= now]
            conn.queue = collections.deque(e for e in conn.queue if e.deadline > now)
            for exchange in late:
                exchange.tell(UpstreamError("agent did not answer in time", status_hint=504))
            # What is still queued there is a GET that may have been answered, unread: it goes
            # once more, as after any close.
            conn._end(UpstreamError("agent did not answer in time", status_hint=504), head=False)
        self._watched = bool(self._busy)
        return self._watched

    def _forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if self._current is conn:
            self._current = None
        if conn in self._idle:
            self._idle.remove(conn)

    async def close(self) -> None:
        """Close every connection, idle or busy (busy ones fail with 502)."""
        for task in list(self._opening):
            task.cancel()
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
