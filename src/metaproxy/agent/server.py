"""The agent's Unix-socket HTTP service: check the front's identity headers, look up, sign, relay.

Programmatic use (e.g. `metaproxy up`, in its own event loop)::

    agent = AgentServer(config, directory)   # directory: a metadata.records.PortDirectory
    await agent.start()                      # the socket exists, mode and backlog applied
    ...
    await agent.stop()                       # stops serving, closes the pool, removes the socket

`serve(config, directory, stop)` does the same until the `stop` event is set.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from metaproxy.agent.config import AgentConfig
from metaproxy.agent.identity import ClientKey, client_key
from metaproxy.agent.listener import Listener, bind_unix
from metaproxy.agent.lookup import NotFound, PortRegistry, Registry
from metaproxy.agent.protocol import AgentProtocol, Request
from metaproxy.agent.upstream import Reply, Upstream, generic_body
from metaproxy.config import resolve_group
from metaproxy.errors import ClientProtocolError, UpstreamError
from metaproxy.metadata.records import PortDirectory, PortMatch

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 5.0


class AgentServer:
    """One agent: a listening socket, a registry (with its cache) and an upstream pool."""

    def __init__(
        self,
        config: AgentConfig,
        directory: PortDirectory | None = None,
        *,
        registry: Registry | None = None,
    ) -> None:
        if registry is None:
            if directory is None:
                raise ValueError("AgentServer needs a directory or a registry")
            registry = PortRegistry(directory, ttl=config.cache_ttl)
        self.config = config
        self.registry = registry
        self.upstream = Upstream(config.upstream, config.shared_secret)
        self.statuses: collections.Counter[int] = collections.Counter()
        self._listener: Listener | None = None
        self._owns_listener = True
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[AgentProtocol] = set()
        self._keys: dict[tuple[tuple[bytes, bytes], ...], ClientKey] = {}

    @property
    def socket_path(self) -> Path:
        return self.config.socket_path

    async def start(self, listener: Listener | None = None) -> None:
        """Bind the socket (or serve `listener`, which the caller keeps) and serve.

        On failure nothing this call made is left behind.
        """
        cfg = self.config
        self._owns_listener = listener is None
        if listener is None:
            listener = listen(cfg)
        try:
            await self.upstream.start()

            # asyncio calls listen() again on a given socket: pass the backlog, or its
            # default (100) silently replaces ours.
            server = await asyncio.get_running_loop().create_unix_server(
                self._protocol, sock=listener.sock, backlog=cfg.backlog
            )
        except BaseException:
            if self._owns_listener:
                listener.close()
            await self.upstream.close()
            raise
        self._listener, self._server = listener, server
        log.info(
            "metadata agent (pid %d) serving on %s, upstream %s",
            os.getpid(),
            cfg.socket_path,
            cfg.upstream.url,
        )

    def _protocol(self) -> AgentProtocol:
        cfg = self.config
        return AgentProtocol(
            self._handle, self._connections, max_head=cfg.max_head, max_body=cfg.max_body
        )

    async def accept(self, sock: socket.socket) -> None:
        """Serve one already-connected stream socket as if it had come through the listener
        (a front worker's connection, made by the manager with socketpair())."""
        if self._server is None:
            sock.close()
            raise UpstreamError("the agent is not serving", status_hint=503)
        await asyncio.get_running_loop().connect_accepted_socket(self._protocol, sock)

    async def stop(self) -> None:
        """Stop serving, close the upstream pool and remove the socket file."""
        if self._server is not None:
            self._server.close()
            self._server = None
            await self._drain()
        await self.upstream.close()
        if self._listener is not None:
            if self._owns_listener:
                self._listener.close()
            self._listener = None
            log.info("metadata agent on %s stopped", self.config.socket_path)

    async def __aenter__(self) -> AgentServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _drain(self) -> None:
        """Close idle connections now; give busy ones DRAIN_TIMEOUT to finish their answer."""
        deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT
        while True:
            for conn in list(self._connections):
                if not conn.busy:
                    conn.close()
            if not self._connections or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.close()

    def _handle(self, request: Request, done: Callable[[Reply], None]) -> None:
        """Check the identity, look the port up, relay; `done` gets the answer, once."""
        try:
            key = self._keys.get(request.identity)
            if key is None:
                key = self._client_key(request)
            if not request.target.startswith("/"):
                raise ClientProtocolError(
                    f"request target {request.target[:80]!r} is not origin-form"
                )
        except ClientProtocolError as exc:
            # Fronts build these headers themselves: a bad one is a front bug or a spoof.
            log.warning("refusing request from a front: %s", exc)
            self.statuses[exc.status_hint] += 1
            done(_error(exc.status_hint))
            return
        relay = _Relay(self, request, key, done)
        relay.guarded(relay.start)

    def _client_key(self, request: Request) -> ClientKey:
        """client_key() of the identity fields, remembered for the exact same fields.

        client_key is pure: the same identity fields (names, values, order) always give the
        same key, so a remembered key is the key; anything it refuses is never remembered.
        """
        key = client_key(request.getall)
        if len(self._keys) >= _KEY_CACHE:
            self._keys.clear()
        self._keys[request.identity] = key
        return key


_KEY_CACHE = 65536


class _Relay:
    """One request from lookup to answer, including the one retry after a server 404."""

    __slots__ = ("agent", "cached", "done", "key", "match", "request")

    def __init__(
        self,
        agent: AgentServer,
        request: Request,
        key: ClientKey,
        done: Callable[[Reply], None],
    ) -> None:
        self.agent = agent
        self.request = request
        self.key = key
        self.done = done
        self.match: PortMatch | None = None  # once looked up
        self.cached = False

    def answer(self, reply: Reply) -> None:
        self.agent.statuses[reply.status] += 1
        self.done(reply)

    def guarded(self, step: Callable[[], None]) -> None:
        """Run one step; a refusal or failure becomes the answer."""
        try:
            step()
        except NotFound as exc:
            log.info("no single port for this request: %s", exc)
            self.answer(_error(404))
        except ClientProtocolError as exc:
            log.warning("refusing request from a front: %s", exc)
            self.answer(_error(exc.status_hint))
        except Exception:
            log.exception("unexpected error while relaying a metadata request")
            self.answer(_error(500))

    def start(self) -> None:
        match, self.cached = self.agent.registry.resolve(self.key)
        self.match = match
        self._send(match, self.relayed)

    def _send(self, match: PortMatch, then: Callable[[Reply], None]) -> None:
        request = self.request
        self.agent.upstream.submit(
            request.method, request.target, request.relayed, request.body, match, self.key.ip, then
        )

    def relayed(self, reply: Reply) -> None:
        if reply.status == 404 and self.cached:
            self.guarded(lambda: self._retry(reply))
        else:
            self.answer(reply)

    def _retry(self, reply: Reply) -> None:
        # The metadata server does not know a cached instance: the port may have moved to
        # another instance since. Ask the store once more, and retry if the answer changed.
        key, match = self.key, self.match
        fresh, _ = self.agent.registry.resolve(key, fresh=True)
        if match is None or fresh == match:
            self.answer(reply)
            return
        log.info(
            "port for %s on %s %s moved from instance %s to %s: retrying",
            key.ip,
            key.kind,
            key.id,
            match.instance_id,
            fresh.instance_id,
        )
        self._send(fresh, self.answer)


def listen(cfg: AgentConfig) -> Listener:
    """The agent's listening socket, mode and backlog applied; the caller must close it."""
    group = resolve_group(cfg.proxy_group, key="agent.proxy_group")
    mode = cfg.socket_mode_bits()
    listener = bind_unix(
        cfg.socket_path,
        mode=mode,
        backlog=cfg.backlog,
        group=group if cfg.socket_mode == "group" else None,
    )
    log.info("metadata agent socket %s (mode %04o, backlog %d)", cfg.socket_path, mode, cfg.backlog)
    return listener


def _error(status: int) -> Reply:
    return Reply(status, generic_body(status), (("Content-Type", "text/plain"),))


async def serve(
    config: AgentConfig,
    directory: PortDirectory,
    stop: asyncio.Event,
    listener: Listener | None = None,
) -> None:
    """Run an agent until `stop` is set; its own socket (not `listener`) is removed after."""
    agent = AgentServer(config, directory)
    await agent.start(listener)
    try:
        await stop.wait()
    finally:
        await agent.stop()
