"""The agent's HTTP/1.1 shell on its Unix socket: llhttp (httptools) parses, a handler answers.

Each connection reads whole requests — the head up to the blank line within `max_head` bytes
and `MAX_HEADERS` fields (else 431), then the body by Content-Length or chunks within
`max_body` (else 413) — and answers them strictly in order, so pipelining is safe. Pipelined
GETs and HEADs go to the handler together (a slow one does not hold up the work of those behind
it, only their answers); any other method waits until everything before it is answered, and
everything after it waits for its answer. A request's `X-Metaproxy-Seq` field is echoed in its
answer, which is how a builtin front checks that each answer is the one it is waiting for
(`metaproxy.http.client`). No policy lives here: the handler decides; this layer only moves
bytes and enforces sizes and idleness.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

import httptools

from metaproxy.agent.identity import FORWARDED_FOR, NETWORK_HEADER, ROUTER_HEADER
from metaproxy.agent.upstream import FORWARDED_HEADERS, Reply, generic_body
from metaproxy.http import sequence

log = logging.getLogger(__name__)

MAX_HEADERS = 100
IDLE_TIMEOUT = 60.0
MAX_PENDING = 16  # pipelined requests queued before we stop reading


# Header fields the agent reads, by lower-case name; every other field a front sends is dropped.
IDENTITY_FIELDS = frozenset(
    name.lower().encode() for name in (NETWORK_HEADER, ROUTER_HEADER, FORWARDED_FOR)
)
RELAYED_FIELDS = frozenset(name.lower().encode() for name in FORWARDED_HEADERS)
_IDENTITY, _RELAYED, _LENGTH, _EXPECT, _SEQ = 1, 2, 3, 4, 5
_FIELDS = {
    **dict.fromkeys(IDENTITY_FIELDS, _IDENTITY),
    **dict.fromkeys(RELAYED_FIELDS, _RELAYED),
    b"content-length": _LENGTH,
    b"expect": _EXPECT,
    sequence.NAME: _SEQ,
}
# Requests of one connection that may be worked on at once (no side effects to order).
_CONCURRENT = frozenset({"GET", "HEAD"})


class Request:
    """One whole request as the front sent it, reduced to what the agent reads.

    `identity`: the identity fields (lower-case name, value), in order, every occurrence;
    `relayed`: the allow-listed client fields (lower-case name, value), in order.
    """

    __slots__ = ("body", "identity", "keep_alive", "method", "relayed", "target")

    def __init__(
        self,
        method: str,
        target: str,
        identity: tuple[tuple[bytes, bytes], ...],
        relayed: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.identity = identity
        self.relayed = relayed
        self.body = body
        self.keep_alive = keep_alive

    def getall(self, name: str) -> list[str]:
        """Every value of identity field `name`, compared case-insensitively."""
        lower = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.identity if k == lower]


# The handler answers by calling its second argument exactly once, now or later.
Handler = Callable[[Request, Callable[[Reply], None]], None]


class _Refuse(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Item:
    """A pending answer: a request for the handler, or a refusal (`status`, then close).

    `seq`: the request's X-Metaproxy-Seq, echoed in the answer; `reply`: the handler's answer,
    kept until those before it are written.
    """

    __slots__ = ("keep_alive", "owner", "reply", "request", "seq", "status")

    def __init__(
        self,
        owner: AgentProtocol,
        request: Request | None,
        keep_alive: bool,
        status: int = 400,
        seq: bytes = b"",
    ) -> None:
        self.owner = owner
        self.request = request
        self.keep_alive = keep_alive
        self.status = status
        self.seq = seq
        self.reply: Reply | None = None

    def answered(self, reply: Reply) -> None:
        """The handler's callback for this request."""
        if self.reply is None:
            self.reply = reply
            owner = self.owner
            owner._flush()
            owner._next()


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
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.TimerHandle | None = None
        self._last = 0.0  # loop time of the last byte in or answer out
        # Requests read and not yet answered, in order; the first `_handed` are with the handler.
        self._pending: collections.deque[_Item] = collections.deque()
        self._handed = 0
        self._running = False  # inside _next (a handler may answer at once)
        self._paused = False
        self._broken = False
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._identity: tuple[tuple[bytes, bytes], ...] = ()
        self._relayed: tuple[tuple[bytes, bytes], ...] = ()
        self._seq = b""
        self._body: list[bytes] = []
        self._body_bytes = 0

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)
        self._last = self._loop.time()
        self._idle = self._loop.call_later(IDLE_TIMEOUT, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None
        self._pending.clear()
        self._handed = 0

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self._last = self._loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            cause = exc.__context__
            status = cause.status if isinstance(cause, _Refuse) else 400
            if not isinstance(cause, _Refuse):
                log.warning("refusing a malformed request from a front: %s", exc)
            self._broken = True
            self._enqueue(_Item(self, None, keep_alive=False, status=status))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head:
            raise _Refuse(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head or len(headers) > MAX_HEADERS:
            raise _Refuse(431)

    def on_headers_complete(self) -> None:
        expect = False
        seq = None
        identity = []
        relayed = []
        for name, value in self._headers:
            lower = name.lower()
            kind = _FIELDS.get(lower)
            if kind is None:
                continue
            if kind == _IDENTITY:
                identity.append((lower, value))
            elif kind == _RELAYED:
                relayed.append((lower, value))
            elif kind == _LENGTH:
                if value.isdigit() and int(value) > self._max_body:
                    raise _Refuse(413)
            elif kind == _SEQ:
                if seq is not None or not sequence.valid(value):
                    raise _Refuse(400)
                seq = value
            elif value.strip().lower() == b"100-continue":
                expect = True
        self._seq = seq or b""
        self._identity = tuple(identity)
        self._relayed = tuple(relayed)
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
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        request = Request(
            _method(parser.get_method()),
            self._url.decode("latin-1"),
            self._identity,
            self._relayed,
            b"".join(self._body) if self._body else b"",
            keep_alive,
        )
        seq = self._seq
        self._reset()  # for the next message on this connection
        self._enqueue(_Item(self, request, keep_alive, seq=seq))

    # -- answering, in order ----------------------------------------------------------------

    def _enqueue(self, item: _Item) -> None:
        self._pending.append(item)
        if len(self._pending) >= MAX_PENDING and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._next()

    def _next(self) -> None:
        """Hand the requests that may start now to the handler, in order (see the module doc);
        a refused one gets its answer in its turn."""
        if self._running:
            return  # the loop below picks it up
        self._running = True
        pending = self._pending
        try:
            # A handler may answer at once: `_flush` then pops answered items and lowers
            # `_handed`, so the index below stays right.
            while self._handed < len(pending) and self._transport is not None:
                item = pending[self._handed]
                request = item.request
                if request is None:
                    self._handed += 1
                    item.answered(Reply(item.status, generic_body(item.status)))
                    continue
                if self._handed:
                    ahead = pending[self._handed - 1].request
                    if request.method not in _CONCURRENT or (
                        ahead is not None and ahead.method not in _CONCURRENT
                    ):
                        break  # waits for everything before it to be answered
                self._handed += 1
                self._handler(request, item.answered)
        finally:
            self._running = False

    def _flush(self) -> None:
        """Write the answers that are next in order."""
        pending = self._pending
        while pending:
            reply = pending[0].reply
            if reply is None:
                break
            item = pending.popleft()
            self._handed -= 1
            self._write(reply, item)
        if self._paused and len(pending) <= MAX_PENDING // 2 and self._transport is not None:
            self._transport.resume_reading()
            self._paused = False

    def _write(self, reply: Reply, item: _Item) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._last = self._loop.time()
        head_only = item.request is not None and item.request.method == "HEAD"
        head = _head(reply.status, reply.headers) + b"Content-Length: %d\r\n" % len(reply.body)
        if item.seq:
            head += sequence.line(item.seq)
        if not item.keep_alive:
            head += b"Connection: close\r\n\r\n"
            transport.write(head if head_only else head + reply.body)
            self._pending.clear()
            self._handed = 0
            self.close()
            return
        head += b"\r\n"
        transport.write(head if head_only else head + reply.body)

    def _check_idle(self) -> None:
        """Close a connection idle for IDLE_TIMEOUT (one timer per connection, not per byte)."""
        self._idle = None
        if self._transport is None:
            return
        quiet = self._loop.time() - self._last
        if not self.busy and quiet >= IDLE_TIMEOUT:
            self.close()
            return
        wait = IDLE_TIMEOUT if self.busy else max(IDLE_TIMEOUT - quiet, 0.01)
        self._idle = self._loop.call_later(wait, self._check_idle)


_METHODS: dict[bytes, str] = {}


def _method(raw: bytes) -> str:
    method = _METHODS.get(raw)
    if method is None:
        method = raw.decode("ascii")
        if len(_METHODS) < 64:
            _METHODS[raw] = method
    return method


_HEADS: dict[tuple[int, tuple[tuple[str, str], ...]], bytes] = {}


def _head(status: int, headers: tuple[tuple[str, str], ...]) -> bytes:
    """Status line, Server, the reply's headers and a Content-Type: rendered once per kind."""
    head = _HEADS.get((status, headers))
    if head is None:
        lines = [_status_line(status), b"Server: metaproxy"]
        lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
        if not any(k.lower() == "content-type" for k, _ in headers):
            lines.append(b"Content-Type: text/plain")
        head = b"\r\n".join(lines) + b"\r\n"
        if len(_HEADS) >= 1024:  # token TTL values vary; the rest is a handful of kinds
            _HEADS.clear()
        _HEADS[(status, headers)] = head
    return head


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
