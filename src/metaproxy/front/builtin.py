"""The builtin engine: one asyncio loop serving the fronts of every network on the host.

`BuiltinFront` is what the host service and `ns-proxy --engine builtin` drive:

    engine = BuiltinFront(EngineOptions(...))
    await engine.add(spec)        # listens inside spec.netns; NamespaceError / ConfigError
    engine.stats(spec.name)       # FrontStats: requests, errors, last_error, per status, ...
    await engine.remove(spec.name)
    await engine.close()

A failure to add one front raises for that front only; the others keep serving. Each client
connection is an `asyncio.Protocol` (`_Connection`): it frames heads itself, checks them with
`http.wire`/`http.policy`, and hands one request at a time to the pooled agent client, so
pipelined requests are answered in order. The hot path is callbacks only: the pooled agent
connection's `data_received` completes the exchange and writes the answer to the client; no
Task, Future or timer is made per request (deadlines are swept by the engine's `Ticker`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import cast

from metaproxy.config import FrontSpec
from metaproxy.errors import ConfigError, UpstreamError
from metaproxy.front.netns import ListenSpec, open_listener_async
from metaproxy.front.ratelimit import (
    MAX_CONN_PER_SOURCE,
    RateLimitConfig,
    RateLimiter,
    SourceLimits,
)
from metaproxy.http import policy, sequence, wire
from metaproxy.http.client import Cancel, Connector, UpstreamPool
from metaproxy.http.outbox import Outbox
from metaproxy.http.policy import Refusal, UpstreamRequest
from metaproxy.http.ticker import Ticker

log = logging.getLogger(__name__)
access_log = logging.getLogger("metaproxy.access")

# Requests buffered ahead of the one being answered (pipelining) before we stop reading.
_PIPELINE_BUFFER = 256 * 1024
_LOG_PATH_MAX = 512
# Screened heads a front keeps (`_Front.remember`), and the longest head kept.
_SCREENED_MAX = 64
_SCREENED_HEAD = 1024


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Engine-wide knobs; per-network ones (timeouts, maxconn, body cap) live in FrontSpec."""

    max_conn_per_source: int = MAX_CONN_PER_SOURCE
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    access_log: bool = True
    freebind: bool = False
    # On remove/close, requests in flight get this long to finish (then connections are cut).
    drain_timeout: float = 3.0
    # GETs in flight at once on one agent connection, once it has echoed a request's sequence
    # number (metaproxy's agent does, Neutron's does not: see metaproxy.http.client). 1: never.
    pipeline: int = sequence.PIPELINE

    def __post_init__(self) -> None:
        SourceLimits(self.max_conn_per_source, self.rate_limit)  # the limits' own checks
        sequence.check_pipeline(self.pipeline, "pipeline")


@dataclass(slots=True)
class FrontStats:
    """Counters for status pages and metrics; `errors` counts upstream failures (5xx we made)."""

    requests: int = 0
    errors: int = 0
    refused: int = 0
    last_error: str | None = None
    connections: int = 0
    rejected_connections: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


class _Front:
    """One network's listener, its connections and counters."""

    def __init__(
        self, spec: FrontSpec, pool: UpstreamPool, options: EngineOptions, limiter: RateLimiter
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.options = options
        self.limiter = limiter
        # The engine's deadline sweep and outbox, which its pools share (BuiltinFront._pool).
        self.ticker: Ticker = pool.ticker
        self.outbox: Outbox = pool.outbox
        self.watched = False
        timeouts = spec.timeouts
        self.shortest = min(timeouts.http_request, timeouts.client, timeouts.http_keep_alive)
        self.identity = spec.identity.as_headers()
        self.label = f"{spec.identity.kind}={spec.identity.id}"
        self.stats = FrontStats()
        # Raw head → what the policy made of it (`remember`).
        self.screened: dict[bytes, tuple[UpstreamRequest, bytes]] = {}
        self.per_source: dict[str, int] = {}
        self.connections: set[_Connection] = set()
        self.server: asyncio.Server | None = None
        self.draining = False
        self.drained = asyncio.Event()

    def remember(self, raw: bytes, request: UpstreamRequest, fields: bytes) -> None:
        """Keep an accepted head's screening for the next identical head.

        `policy.screen` is a pure function of the head's bytes and this front's body cap, so a
        head seen before gets the same request without being parsed again: the instances of one
        network send the same few heads over and over (cloud-init's). Per front, so that no
        network can learn from timing what another network's instances asked for; bounded,
        and only short heads, so that a guest sending ever new heads costs a little CPU, not
        memory. Refusals are never kept: they are rare, and each is logged.
        """
        if len(raw) > _SCREENED_HEAD:
            return
        screened = self.screened
        if len(screened) >= _SCREENED_MAX:
            screened.clear()
        screened[raw] = (request, fields)

    def count(self, status: int) -> None:
        stats = self.stats
        stats.requests += 1
        stats.statuses[status] = stats.statuses.get(status, 0) + 1

    def sweep(self, now: float) -> bool:
        """The ticker's call: 408 or close for every connection past its deadline."""
        due = [conn for conn in self.connections if conn.deadline <= now]
        for conn in due:
            conn._expire()
        self.watched = bool(self.connections)
        return self.watched


class _Connection(asyncio.Protocol):
    """One instance connection: keep-alive, pipelining, timeouts, caps."""

    def __init__(self, front: _Front) -> None:
        self.front = front
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport
        self.buf = bytearray()
        self.scanned = 0
        self.peer = ""
        self.peer_bytes = b""
        self.ip_version = 4
        self.phase = "head"  # head | body | busy | idle | closed
        self.deadline = 0.0
        self.eof = False
        self.upstream: Cancel | None = None  # the request in flight (set by the pool)
        self.request: UpstreamRequest | None = None
        self.started = 0.0
        self.pending: UpstreamRequest | None = None  # its head is read, its body is not
        self.pending_fields = b""  # its serialized fields
        self.tail = b""  # the identity fields and X-Forwarded-For, serialized
        self.writable = True
        self.reading = True
        self.counted = False
        self.limited = False

    # -- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        front = self.front
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else "unknown"
        self.peer = host.split("%", 1)[0]
        self.peer_bytes = self.peer.encode()
        self.tail = wire.identity_tail(front.identity, self.peer_bytes)
        self.ip_version = 6 if ":" in self.peer else 4
        # The limiter's config is frozen: whether it counts this peer is known at connect.
        self.limited = front.limiter.applies_to(self.ip_version)
        stats = front.stats
        held = front.per_source.get(self.peer, 0)
        if len(front.connections) >= front.spec.maxconn:
            self._reject(503, "network connection cap reached")
            return
        if held >= front.options.max_conn_per_source:
            self._reject(429, "per-source connection cap reached")
            return
        front.per_source[self.peer] = held + 1
        front.connections.add(self)
        self.counted = True
        stats.connections += 1
        self._arm(front.spec.timeouts.http_request)
        if not front.watched:
            front.watched = True
            front.ticker.watch(front, front.shortest)

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if (phase == "idle" or phase == "head") and self.writable and not self.buf:
            # The usual case: exactly one whole head in one read. Take it as it is, without
            # copying it through the buffer (and without an http-request deadline: the head
            # is complete); anything else is framed from the buffer.
            end = data.find(wire.HEAD_END, 0, policy.MAX_HEAD + 4)
            if end > 0 and end + 4 == len(data) and not data.startswith(b"\r\n"):
                self.phase = "head"
                self._take(data)
                return
        if phase == "closed":
            return
        if phase == "idle":
            self.phase = phase = "head"
            self._arm(self.front.spec.timeouts.http_request)
        self.buf += data
        if phase == "busy" or not self.writable:
            if len(self.buf) > _PIPELINE_BUFFER and self.reading:
                self.reading = False
                self.transport.pause_reading()
            return
        self._advance()

    def eof_received(self) -> bool | None:
        # A half-closed client still gets the answers to what it already sent, then we close.
        self.eof = True
        return True if self.phase == "busy" else None

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self.phase in ("idle", "head", "body") and self.buf:
            if self.phase == "idle":
                self.phase = "head"
                self._arm(self.front.spec.timeouts.http_request)
            self._advance()

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = "closed"
        upstream = self.upstream
        if upstream is not None:
            # Abandoned: the agent connection carrying it is closed, as a cancelled exchange.
            self.upstream = None
            upstream.cancel()
        self._release()

    # -- framing -----------------------------------------------------------------------------

    def _advance(self) -> None:
        """Frame and dispatch the next request in the buffer, if it is complete."""
        buf = self.buf
        request = self.pending
        if request is not None:
            length = request.content_length
            if len(buf) < length:
                return
            self.pending = None
            body = bytes(buf[:length])
            del buf[:length]
            self._dispatch(request, self.pending_fields, body)
            return
        while buf.startswith(b"\r\n"):
            # RFC 9112 §2.2: ignore empty lines before a request line.
            del buf[:2]
        end = buf.find(wire.HEAD_END, 0, policy.MAX_HEAD + 4)
        if end < 0:
            if len(buf) > policy.MAX_HEAD:
                self._refuse(Refusal(431, "request head over 8 KiB"))
            elif policy.has_bad_bytes(buf, max(self.scanned - 1, 0)):
                self._refuse(Refusal(400, "bare CR/LF, control byte or obs-fold in head"))
            else:
                self.scanned = len(buf)
            return
        raw = bytes(buf[: end + 4])
        del buf[: end + 4]
        self._take(raw)

    def _take(self, raw: bytes) -> None:
        """One whole head, out of the buffer: refuse it, wait for its body, or dispatch it."""
        self.scanned = 0
        front = self.front
        screened = front.screened.get(raw)
        if screened is not None:
            request, fields = screened
        else:
            parsed = wire.parse_head(raw)
            if isinstance(parsed, Refusal):
                self._refuse(parsed, *wire.peek_request_line(raw))
                return
            method, target, version, headers = parsed
            # `policy.decide` minus the identity fields, which `tail` carries as bytes.
            checked = policy.screen(method, target, version, headers, max_body=front.spec.max_body)
            if isinstance(checked, Refusal):
                self._refuse(checked, method, target)
                return
            request = checked
            fields = wire.serialize_screened(request)
            front.remember(raw, request, fields)
        if self.limited and not front.limiter.allow(self.peer):
            self._refuse(Refusal(429, "rate limit exceeded"), request.method, request.target)
            return
        length = request.content_length
        if length:
            buf = self.buf
            if len(buf) < length:
                self.pending = request
                self.pending_fields = fields
                self.phase = "body"
                self._arm(front.spec.timeouts.client)
                if request.expect_continue and not buf:
                    self._send(wire.CONTINUE)
                return
            body = bytes(buf[:length])
            del buf[:length]
        else:
            body = b""
        self._dispatch(request, fields, body)

    def _dispatch(self, request: UpstreamRequest, fields: bytes, body: bytes) -> None:
        # The deadline stays: `_expire` ignores a busy connection (the upstream has its own).
        self.phase = "busy"
        self.request = request
        # 0.0 unless this request goes to the access log (then: when it started).
        self.started = (
            time.monotonic()
            if self.front.options.access_log and access_log.isEnabledFor(logging.INFO)
            else 0.0
        )
        method = request.method
        self.front.pool.submit(
            fields + self.tail,
            body,
            self,
            head=method == b"HEAD",
            pipelined=method == b"GET" and not body,
        )

    # -- the pool's callbacks (http.client.Sink) ---------------------------------------------

    def upstream_response(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        head_length: bytes | None,
        kept: bool,
    ) -> None:
        self.upstream = None
        request = self.request
        if self.phase == "closed" or request is None:
            return
        close = not request.keep_alive
        if request.method == b"HEAD":
            out = wire.serialize_response(
                status, headers, b"", close=close, head_length=head_length
            )
        else:
            out = wire.serialize_response(status, headers, body, close=close)
        self._answer(request, status, out, close)

    def upstream_failed(self, error: UpstreamError) -> None:
        self.upstream = None
        request = self.request
        if request is None:
            return
        front = self.front
        status = error.status_hint
        front.stats.errors += 1
        front.stats.last_error = str(error)
        log.warning("%s client=%s upstream failed: %s", front.label, self.peer, error)
        if self.phase == "closed":
            return
        close = not request.keep_alive
        out = wire.error_response(status, close=close, head_only=request.method == b"HEAD")
        self._answer(request, status, out, close)

    def _answer(self, request: UpstreamRequest, status: int, out: bytes, close: bool) -> None:
        """Write the answer to `request`, then go on with the next one or close."""
        self.request = None
        front = self.front
        transport = self.transport
        if front.draining and not close:
            out = _with_close(out)
            close = True
        front.outbox.write(transport, out)
        stats = front.stats
        stats.requests += 1
        statuses = stats.statuses
        statuses[status] = statuses.get(status, 0) + 1
        if self.started:
            self._log(request.method, request.target, status, len(out), self.started)
        if close or (self.eof and not self.buf):
            self._close()
            return
        self.phase = "idle"
        self.deadline = self.loop.time() + front.spec.timeouts.http_keep_alive
        if not self.reading:
            self.reading = True
            transport.resume_reading()
        if self.buf and self.writable:
            self.phase = "head"
            self._arm(front.spec.timeouts.http_request)
            self._advance()

    # -- endings -----------------------------------------------------------------------------

    def _refuse(self, refusal: Refusal, method: bytes = b"-", target: bytes = b"-") -> None:
        """Answer a refusal ourselves and close: after a bad head, framing cannot be trusted."""
        front = self.front
        out = wire.error_response(refusal.status)
        self._send(out)
        front.count(refusal.status)
        front.stats.refused += 1
        log.info(
            "%s client=%s refused %d: %s", front.label, self.peer, refusal.status, refusal.reason
        )
        if front.options.access_log:
            self._log(method, target, refusal.status, len(out), time.monotonic())
        self._close()

    def _reject(self, status: int, reason: str) -> None:
        """Turn a connection away before reading anything (connection caps)."""
        front = self.front
        front.stats.rejected_connections += 1
        log.warning("%s client=%s connection rejected: %s", front.label, self.peer, reason)
        self._send(wire.error_response(status))
        self._close()

    def _arm(self, timeout: float) -> None:
        """Move the deadline: a float store; the front's sweep (`_Front.sweep`) enforces it."""
        self.deadline = self.loop.time() + timeout

    def _expire(self) -> None:
        if self.phase == "busy":
            return
        if self.phase in ("head", "body"):
            # haproxy's `timeout http-request`: a slow sender gets 408 and the connection ends.
            self._send(wire.error_response(408))
            self.front.count(408)
            log.info("%s client=%s request timed out", self.front.label, self.peer)
        self._close()

    def _send(self, data: bytes) -> None:
        """Every write to the client goes through the engine's outbox, in order."""
        self.front.outbox.write(self.transport, data)

    def _close(self) -> None:
        if self.phase != "closed":
            self.phase = "closed"
            self.front.outbox.flush()  # what this connection queued goes out before the FIN
            self.transport.close()
        self._release()

    def _release(self) -> None:
        if not self.counted:
            return
        self.counted = False
        front = self.front
        front.connections.discard(self)
        if front.draining and not front.connections:
            front.drained.set()
        held = front.per_source.get(self.peer, 1) - 1
        if held > 0:
            front.per_source[self.peer] = held
        else:
            front.per_source.pop(self.peer, None)
        front.stats.connections -= 1

    def _log(self, method: bytes, target: bytes, status: int, size: int, started: float) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        access_log.info(
            "%s client=%s method=%s path=%s status=%d bytes=%d duration_ms=%.1f",
            self.front.label,
            self.peer,
            wire.printable(method[:_LOG_PATH_MAX]),
            wire.printable(target[:_LOG_PATH_MAX]),
            status,
            size,
            (time.monotonic() - started) * 1000,
        )


class BuiltinFront:
    """Every builtin front of this process, served from the running loop (see module doc)."""

    def __init__(
        self, options: EngineOptions | None = None, *, connector: Connector | None = None
    ) -> None:
        self.options = options or EngineOptions()
        self.connector = connector
        self._fronts: dict[str, _Front] = {}
        self._pools: dict[tuple[str, float, float], UpstreamPool] = {}
        # One deadline sweep and one outbox for every front and pool of this engine.
        self._ticker = Ticker()
        self._outbox = Outbox()

    def names(self) -> list[str]:
        return sorted(self._fronts)

    def __contains__(self, name: object) -> bool:
        return name in self._fronts

    def stats(self, name: str) -> FrontStats:
        """The live counters of front `name` (KeyError if it is not served)."""
        return self._fronts[name].stats

    def sockname(self, name: str) -> tuple[str, int]:
        """The address front `name` listens on (useful with port 0)."""
        server = self._fronts[name].server
        if server is None:
            raise KeyError(name)
        address = server.sockets[0].getsockname()
        return str(address[0]), int(address[1])

    async def add(self, spec: FrontSpec, *, sock: socket.socket | None = None) -> None:
        """Start serving `spec`; raises NamespaceError / ConfigError for this front only.

        `sock`, when given, is the listener to serve (already listening where `spec` says: one
        worker's socket of a reuseport group, or one a front worker got from its manager, which
        alone may enter namespaces); the engine owns it from then on.
        """
        if spec.name in self._fronts:
            raise ConfigError(f"{spec.name} is already served", key="identity")
        listen = listen_spec(spec, freebind=self.options.freebind)
        if sock is None:
            sock = await open_listener_async(listen)
        front = _Front(spec, self._pool(spec), self.options, RateLimiter(self.options.rate_limit))
        try:
            # create_server(sock=...) calls listen() again, with 100 unless told: a boot storm
            # of a few hundred instances would then lose SYNs and wait 1 s, 3 s, 7 s.
            front.server = await asyncio.get_running_loop().create_server(
                lambda: _Connection(front), sock=sock, backlog=listen.backlog
            )
        except BaseException:
            sock.close()
            raise
        self._fronts[spec.name] = front
        where = f" in {spec.netns}" if spec.netns else ""
        log.info("serving %s on %s port %d%s", spec.name, spec.bind_address, spec.port, where)

    async def remove(self, name: str, *, drain: float | None = None) -> None:
        """Stop serving `name` (KeyError if unknown): stop accepting, let requests in flight
        finish for `drain` s (default `drain_timeout`; answered with Connection: close), then
        cut the rest."""
        front = self._fronts.pop(name)
        limit = self.options.drain_timeout if drain is None else drain
        front.draining = True
        if front.server is not None:
            front.server.close()
        for conn in list(front.connections):
            if conn.phase == "idle" or (conn.phase == "head" and not conn.buf):
                conn._close()
        if front.connections and limit > 0:
            try:
                async with asyncio.timeout(limit):
                    await front.drained.wait()
            except TimeoutError:
                log.warning(
                    "%s: cutting %d connections after the drain", name, len(front.connections)
                )
        for conn in list(front.connections):
            conn._close()
        if front.server is not None:
            await front.server.wait_closed()
        log.info("stopped serving %s", name)

    async def close(self, *, drain: float | None = None) -> None:
        """Remove every front (draining them together) and close the upstream pools."""
        await asyncio.gather(*(self.remove(name, drain=drain) for name in list(self._fronts)))
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
        self._ticker.close()

    def _pool(self, spec: FrontSpec) -> UpstreamPool:
        key = (str(spec.upstream_socket), spec.timeouts.connect, spec.timeouts.server)
        pool = self._pools.get(key)
        if pool is None:
            pool = UpstreamPool(
                key[0],
                connect_timeout=key[1],
                server_timeout=key[2],
                depth=self.options.pipeline,
                connector=self.connector,
                ticker=self._ticker,
                outbox=self._outbox,
            )
            self._pools[key] = pool
        return pool


def listen_spec(spec: FrontSpec, *, freebind: bool = False) -> ListenSpec:
    """Where and how the listener of `spec` is opened (by this engine or a front worker's
    manager)."""
    return ListenSpec(
        address=spec.bind_address,
        port=spec.port,
        netns=spec.netns,
        interface=spec.interface,
        freebind=freebind,
        backlog=min(spec.maxconn, 4096),
    )


def _with_close(response: bytes) -> bytes:
    """Add `Connection: close` to a serialized keep-alive response (draining)."""
    end = response.index(wire.HEAD_END)
    return response[:end] + b"\r\nConnection: close" + response[end:]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (much faster here), the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_ns_proxy(spec: FrontSpec, args: argparse.Namespace) -> int:
    """`metaproxy ns-proxy --engine builtin` (see `metaproxy.front.process`)."""
    from metaproxy.front import process

    return process.run_ns_proxy(spec, args)


def destroy_ns_proxy(spec: FrontSpec, args: argparse.Namespace) -> int:
    """`metaproxy ns-proxy --engine builtin --destroy`."""
    from metaproxy.front import process

    return process.destroy_ns_proxy(spec, args)
