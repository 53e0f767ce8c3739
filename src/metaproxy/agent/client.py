"""A lean pooled HTTP/1.1 client for the agent's one upstream: TCP, TLS or a Unix socket.

`HttpPool.submit(data, head=..., method=..., done=...)` writes one serialized request and later
calls `done(answer, None)` with the whole answer, or `done(None, error)` with an UpstreamError
carrying the status the instance should see: 503 when the server cannot be reached (refused,
missing, TLS handshake refused, connect timeout), 504 when it is slower than the timeout (the
wait for a free connection counts), 502 for garbage or a close before the answer ended. A
request that received nothing when its connection closed (a pooled connection the server
closed while idle, or a request queued behind an answer that said `Connection: close`) is sent
once more on a fresh connection: nothing was received, so nothing was processed twice.
`await request(...)` is the same as a coroutine.

The agent's hot path, so no task, future or timer per request: answers are delivered by
callbacks from the connection's parser (llhttp via httptools), and one pool-wide timer, running
only while requests are in flight, expires the slow ones.

Pipelining (`depth` > 1, off by default): GETs may queue behind each other on one connection,
up to `depth` in flight, and what one loop iteration queued goes out in one write. A server that
answers pipelined requests in order (HTTP/1.1 requires it; the embedded metadata server does)
then reads and answers a batch per wake-up instead of one request each, which is most of what a
request costs across two processes. Requests with a body or side effects (POST, PUT) and HEAD
are never pipelined: they go alone on a connection with nothing else in flight.

An answer matched to the wrong request would serve one instance another's metadata, so order
alone is not trusted: when pipelining, every request carries `X-Metaproxy-Seq: N` (unique in
the pool), and requests share a connection only once an answer from the server echoed its
request's number, as the embedded metadata server does (a connection that echoed, or any
connection while the server's last answer echoed). On a connection carrying more than one
request, every answer must echo the number of the request it answers; otherwise (a wrong or
missing number, more answers than requests) the connection ends, the request being answered
gets 502 and the rest go again elsewhere. A server that never echoes (Nova) is sent one request
at a time whatever `depth` says.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

import httptools

from metaproxy.errors import UpstreamError
from metaproxy.http import sequence

log = logging.getLogger(__name__)

MAX_ANSWER = 32 * 1024 * 1024
MAX_IDLE = 256

# The expiry timer's period: a slow answer is noticed at most this late (and at most a tenth of
# the timeout late, for short timeouts).
SWEEP = 0.5


class Answer:
    """A whole answer from the metadata server (a plain slotted class: one per request)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


Done = Callable[[Answer | None, UpstreamError | None], None]


class _Exchange:
    """One request: its bytes, its deadline, whom to tell; on a connection or waiting for one."""

    __slots__ = ("data", "deadline", "done", "finished", "head", "pipelined", "retried", "seq")

    def __init__(self, data: bytes, head: bool, pipelined: bool, deadline: float, done: Done):
        self.data = data
        self.head = head
        self.pipelined = pipelined  # may share a connection with other requests in flight
        self.deadline = deadline
        self.done = done
        self.retried = False
        self.finished = False
        self.seq = b""  # the number the answer must echo (pipelining pools only)

    def finish(self, answer: Answer | None, error: UpstreamError | None) -> None:
        if not self.finished:
            self.finished = True
            try:
                self.done(answer, error)
            except Exception:
                # Inside the parser's callback: an error here must not look like bad bytes.
                log.exception("agent: handling an upstream answer failed")


class _Conn(asyncio.Protocol):
    """One connection: requests in flight in order, answered in order. httptools calls on_*."""

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.queue: collections.deque[_Exchange] = collections.deque()
        self.out: list[bytes] = []
        self.closed = False
        self.used = 0  # answers completed on this connection
        self.exclusive = False  # carrying a request that must be alone (POST, PUT, HEAD)
        self.announced = False  # the server ended an answer with Connection: close
        self.echoes = False  # an answer echoed its request's number: may carry several
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.received = False  # any byte of the current (first queued) answer
        self.framed = False
        self.keep_alive = True
        self.echo: bytes | None = None

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.queue:
            raise UpstreamError("an answer nobody asked for")
        self.received = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if sequence.is_field(name):
            if self.echo is not None:
                raise UpstreamError("answer with two sequence numbers")
            self.echo = value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            raise UpstreamError(f"interim status {status} is not supported")
        if not self.queue:
            raise UpstreamError("an answer nobody asked for")
        exchange = self.queue[0]
        if exchange.seq:
            wrong = sequence.mismatch(
                self.echo, exchange.seq, shared=self.echoes or len(self.queue) > 1
            )
            if wrong is not None:
                raise UpstreamError(wrong)
            echoed = self.echo is not None
            self.echoes = self.echoes or echoed
            self.pool._echoing = echoed
        for key, _ in self.headers:
            lower = key.lower()
            if lower == b"content-length" or lower == b"transfer-encoding":
                self.framed = True
                break
        # llhttp forgets keep-alive once the message completes: ask while it still knows.
        self.keep_alive = self.parser.should_keep_alive()
        if self.queue and self.queue[0].head:
            # llhttp does not know the request was HEAD and would wait for a body: the answer
            # ends here, and the connection is not used again.
            self.keep_alive = False
            self._complete(status)

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_ANSWER:
            raise UpstreamError(f"answer over {MAX_ANSWER} bytes")
        self.chunks.append(data)

    def on_message_complete(self) -> None:
        if self.queue and not self.queue[0].head:
            self._complete(self.parser.get_status_code())

    def _complete(self, status: int) -> None:
        exchange = self.queue.popleft()
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        answer = Answer(status, self.headers, body)
        keep = self.keep_alive and self.framed
        self.used += 1
        self._reset()
        if not keep:
            self.closed = True  # nothing more is read from it; what is queued goes elsewhere
            self.announced = True
        exchange.finish(answer, None)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.queue or self.closed:
            self._fail(UpstreamError("metadata server sent bytes nobody asked for"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, UpstreamError) else UpstreamError(str(exc)))
            return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamError(f"metadata server answered garbage: {exc}"))
            return
        if self.closed:
            self._drop()
        elif not self.queue:
            self.pool._released(self)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.queue and self.received and not self.framed:
            status = self.parser.get_status_code()
            if status >= 200:
                # RFC 9112 §6.3: no Content-Length or chunked framing → the close ends the body.
                self.keep_alive = False
                self._complete(status)
        self.closed = True
        self._drop(UpstreamError("metadata server closed the connection early"))

    # -- the pool's side --------------------------------------------------------------------

    def send(self, exchange: _Exchange) -> None:
        """Queue `exchange`; its bytes go out with whatever else this loop iteration queues."""
        self.queue.append(exchange)
        if not exchange.pipelined:
            self.exclusive = True
        if not self.out:
            self.pool._call_soon(self.flush)
        data = exchange.data
        if self.pool._depth > 1:
            exchange.seq = self.pool._number()
            data = sequence.numbered(data, exchange.seq)
        self.out.append(data)

    def flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.closed and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _fail(self, error: UpstreamError) -> None:
        """Garbage or a broken answer: the request being answered fails, the rest go elsewhere."""
        if self.queue:
            self.queue[0].finish(None, error)
        self._drop()

    def _drop(self, error: UpstreamError | None = None) -> None:
        """Close, and hand every request still queued back to the pool (or fail it)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        queued, self.queue = self.queue, collections.deque()
        self.pool._lost(self, queued, error)

    def shareable(self) -> bool:
        """May a pipelined GET queue here now (behind what is in flight)?"""
        return (
            (self.echoes or (self.pool._echoing and not self.used))
            and not self.closed
            and not self.exclusive
            and self.transport is not None
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


Connect = Callable[[Callable[[], _Conn]], Awaitable[tuple[asyncio.BaseTransport, _Conn]]]


class HttpPool:
    """Keep-alive connections to one server, at most `limit` of them at once."""

    def __init__(
        self, connect: Connect, *, limit: int, connect_timeout: float, depth: int = 1
    ) -> None:
        self._connect_fn = connect
        self._connect_timeout = connect_timeout
        self._limit = limit
        self._depth = depth
        self._idle: list[_Conn] = []  # connected, nothing in flight
        self._busy: set[_Conn] = set()  # something in flight
        self._open = 0  # connections made or being made
        self._waiting: collections.deque[_Exchange] = collections.deque()
        self._opening: list[list[_Exchange]] = []  # requests for connections being made
        self._connecting: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: _Conn | None = None  # where pipelined GETs queue while it has room
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = SWEEP
        self._closing = False
        self._seq = 0
        self._echoing = False  # the server's last answer to a numbered request echoed it

    def _number(self) -> bytes:
        self._seq += 1
        return b"%d" % self._seq

    @classmethod
    def unix(cls, path: str, *, limit: int, connect_timeout: float, depth: int = 1) -> HttpPool:
        async def connect(factory: Callable[[], _Conn]) -> tuple[asyncio.BaseTransport, _Conn]:
            return await asyncio.get_running_loop().create_unix_connection(factory, path)

        return cls(connect, limit=limit, connect_timeout=connect_timeout, depth=depth)

    @classmethod
    def tcp(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        connect_timeout: float,
        depth: int = 1,
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

        return cls(connect, limit=limit, connect_timeout=connect_timeout, depth=depth)

    # -- the API ----------------------------------------------------------------------------

    def submit(self, data: bytes, *, head: bool, method: str, timeout: float, done: Done) -> None:
        """Send `data` (a whole serialized request); `done` gets the answer or the error."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        pipelined = self._depth > 1 and method == "GET" and not head
        exchange = _Exchange(data, head, pipelined, loop.time() + timeout, done)
        self._sweep_every = min(SWEEP, timeout / 10)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        self._dispatch(exchange)

    async def request(self, data: bytes, *, head: bool, timeout: float, method: str = "") -> Answer:
        """`submit` as a coroutine: the answer, or the UpstreamError."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()

        def done(answer: Answer | None, error: UpstreamError | None) -> None:
            if not future.done():
                if answer is not None:
                    future.set_result(answer)
                else:
                    future.set_exception(error or UpstreamError("no answer"))

        self.submit(data, head=head, method=method, timeout=timeout, done=done)
        return await future

    async def close(self) -> None:
        """Close every connection, idle or busy (busy exchanges fail with 502)."""
        self._closing = True
        for exchange in self._waiting:
            exchange.finish(None, UpstreamError("the agent is stopping", status_hint=503))
        self._waiting.clear()
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # -- placing requests on connections ----------------------------------------------------

    def _call_soon(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(callback)

    def _dispatch(self, exchange: _Exchange) -> None:
        if self._closing:
            exchange.finish(None, UpstreamError("the agent is stopping", status_hint=503))
            return
        conn = self._shared(exchange) if exchange.pipelined else None
        if conn is None:
            conn = self._take_idle()
        if conn is not None:
            self._busy.add(conn)
            conn.send(exchange)
            return
        if exchange.pipelined and self._echoing:
            for batch in self._opening:  # a connection on its way: queue there
                if len(batch) < self._depth and batch[0].pipelined:
                    batch.append(exchange)
                    return
        if self._open < self._limit:
            self._open_for(exchange)
        else:
            self._waiting.append(exchange)

    def _open_for(self, exchange: _Exchange) -> None:
        self._open += 1
        batch = [exchange]
        self._opening.append(batch)
        task = asyncio.get_running_loop().create_task(self._connect(batch))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _shared(self, exchange: _Exchange) -> _Conn | None:
        """A busy connection that `exchange` may queue behind (pipelining), or None.

        The same one until it is full: what one loop iteration queues there goes out in one
        write, and the server reads it in one. (A server that answers pipelined requests
        in order serves them one after another anyway: a longer queue costs no latency.)
        """
        depth = self._depth
        conn = self._current
        if conn is not None and len(conn.queue) < depth and conn in self._busy and conn.shareable():
            return conn
        best: _Conn | None = None
        for conn in self._busy:
            if len(conn.queue) < depth and conn.shareable():
                if best is None or len(conn.queue) > len(best.queue):
                    best = conn
        self._current = best
        return best

    def _take_idle(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._open -= 1
        return None

    async def _connect(self, batch: list[_Exchange]) -> None:
        """Open a connection for `batch` (which may grow meanwhile while the server echoes),
        then send it all."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await self._connect_fn(lambda: _Conn(self))
        except TimeoutError:
            error = UpstreamError("metadata server: connect timed out", status_hint=503)
        except ssl.SSLError as exc:
            error = UpstreamError(
                f"metadata server: TLS handshake failed: {exc.reason or exc}", status_hint=503
            )
        except OSError as exc:
            error = UpstreamError(
                f"metadata server unreachable: {exc.strerror or exc}", status_hint=503
            )
        else:
            self._opening.remove(batch)
            live = [exchange for exchange in batch if not exchange.finished]
            if not live or self._closing:  # timed out meanwhile, or stopping
                self._open -= 1
                conn.close()
                for exchange in live:
                    exchange.finish(None, UpstreamError("the agent is stopping", status_hint=503))
                self._next()
                return
            self._busy.add(conn)
            for exchange in live:
                conn.send(exchange)
            return
        self._opening.remove(batch)
        self._open -= 1
        for exchange in batch:
            exchange.finish(None, error)
        self._next()

    def _released(self, conn: _Conn) -> None:
        """`conn` has nothing in flight any more: give it waiting requests, or keep it idle."""
        self._busy.discard(conn)
        conn.exclusive = False
        while self._waiting and len(conn.queue) < self._depth:
            exchange = self._waiting[0]
            if conn.queue and not (conn.shareable() and exchange.pipelined):
                break
            self._waiting.popleft()
            if not exchange.finished:
                self._busy.add(conn)
                conn.send(exchange)
        if conn.queue:
            return
        if len(self._idle) < MAX_IDLE and not self._closing:
            self._idle.append(conn)
        else:
            self._open -= 1
            conn.close()

    def _lost(
        self, conn: _Conn, queued: collections.deque[_Exchange], error: UpstreamError | None
    ) -> None:
        """`conn` is gone: requests that received nothing try once more; the rest fail."""
        if conn in self._busy:
            self._busy.discard(conn)
            self._open -= 1
        elif conn in self._idle:
            self._idle.remove(conn)
            self._open -= 1
        first = True
        for exchange in queued:
            if exchange.finished:
                first = False
                continue
            # Only the answer being read can have been processed: the request at the head of a
            # connection that had answered before (pooled, closed while idle) or one queued
            # behind it received nothing. A fresh connection that fails its first request is
            # the server's fault, not staleness: that request fails.
            # Behind an answer that announced the close, the server processed nothing more
            # (RFC 9112 §9.6): such requests go again without using up their one retry, and
            # every round answers at least one, so this ends.
            answering = first and (conn.received or conn.used == 0)
            if answering or (exchange.retried and not conn.announced):
                exchange.finish(
                    None, error or UpstreamError("metadata server closed the connection early")
                )
            else:
                exchange.retried = exchange.retried or not conn.announced
                self._dispatch(exchange)
            first = False
        self._next()

    def _next(self) -> None:
        """A connection slot was freed: open one for the first waiting request."""
        while self._waiting and self._open < self._limit and not self._closing:
            exchange = self._waiting.popleft()
            if not exchange.finished:
                self._open_for(exchange)

    # -- expiry -----------------------------------------------------------------------------

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._sweeper = None
        if self._waiting and self._waiting[0].deadline <= now:
            kept = collections.deque(e for e in self._waiting if e.deadline > now)
            for exchange in self._waiting:
                if exchange.deadline <= now:
                    exchange.finish(None, _too_slow())
            self._waiting = kept
        for batch in self._opening:
            for exchange in batch:
                if exchange.deadline <= now:
                    exchange.finish(None, _too_slow())
        for conn in list(self._busy):
            if any(e.deadline <= now for e in conn.queue):
                # The late answer would arrive on this connection later: it cannot be reused.
                for exchange in conn.queue:
                    if exchange.deadline <= now:
                        exchange.finish(None, _too_slow())
                conn._drop(_too_slow())
        if self._busy or self._waiting or self._opening:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)


def _too_slow() -> UpstreamError:
    return UpstreamError("metadata server did not answer in time", status_hint=504)
