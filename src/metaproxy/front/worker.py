"""A front worker: the builtin engine in a process of its own, unprivileged and without secrets.

Under `metaproxy up` the process that parses guest traffic should hold nothing worth stealing.
A worker is forked from the zygote (service/zygote.py) before the service read its config or
the shared secret, drops to the front's user, and then only serves what its manager sends over
the channel (front/channel.py):

- orders: `configure` (engine options, log level and target), `add` (a FrontSpec and the
  listening socket the manager opened inside the namespace), `remove`, `upstream` (an agent
  connection the manager made with socketpair(), answering our `connect`), `close` (drain, exit);
- reports: `ready`, `added`/`failed`/`removed` per front, `connect` when the upstream pool
  needs a connection, and `stats` every STATS_INTERVAL seconds.

A worker cannot open namespaces, sockets in the state directory or the store: it has no
privilege to, and needs none. When the manager goes away the worker stops at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from typing import Any

from metaproxy import log as logsetup
from metaproxy.errors import MetaproxyError, UpstreamError
from metaproxy.front import channel
from metaproxy.front.builtin import BuiltinFront, new_event_loop

log = logging.getLogger(__name__)

STATS_INTERVAL = 0.5
_STATS_CHUNK = 200  # fronts per stats message (a message stays far below channel.MAX_MESSAGE)


def run(sock: socket.socket) -> int:
    """The worker's main: serve the channel `sock` until told to close or the manager is gone."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(_Worker(sock).serve())
    finally:
        loop.close()


class _Worker:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.engine: BuiltinFront | None = None
        self.done = asyncio.Event()
        self.drain = 0.0
        self.waiting: dict[int, asyncio.Future[socket.socket]] = {}
        self.ids = itertools.count(1)
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._readable)
        self._report({"op": "ready", "pid": os.getpid(), "uid": os.getuid()})
        stats = asyncio.create_task(self._push_stats())
        try:
            await self.done.wait()
        finally:
            loop.remove_reader(self.sock.fileno())
            stats.cancel()
            if self.engine is not None:
                await self.engine.close(drain=self.drain)
            for future in self.waiting.values():
                future.cancel()
        return 0

    # -- orders ------------------------------------------------------------------------------

    def _readable(self) -> None:
        while not self.done.is_set():
            try:
                got = channel.receive_order(self.sock)
            except BlockingIOError:
                return
            except (OSError, channel.ChannelError) as exc:
                log.error("front worker: channel broken: %s", exc)
                got = None
            if got is None:
                # The manager is gone: nobody can add, remove or answer `connect` any more.
                self.drain = 0.0
                self.done.set()
                return
            order, sockets = got
            self._obey(order, sockets)

    def _obey(self, order: dict[str, Any], sockets: list[socket.socket]) -> None:
        op = order.get("op")
        if op == "configure":
            logsetup.setup(order["log_level"], target=order["log_target"])
            self.engine = BuiltinFront(order["options"], connector=self._connect)
            log.info("front worker %d serving as uid %d", os.getpid(), os.getuid())
        elif op == "add" and sockets:
            self._spawn(self._add(order["spec"], sockets[0]))
            return
        elif op == "remove":
            self._spawn(self._remove(order["name"], order.get("drain")))
        elif op == "upstream":
            future = self.waiting.pop(order["id"], None)
            if future is not None and not future.done():
                if sockets:
                    future.set_result(sockets[0])
                    return
                future.set_exception(UpstreamError(order.get("error", "no agent connection")))
        elif op == "close":
            self.drain = float(order.get("drain", 0.0))
            self.done.set()
        for extra in sockets:
            extra.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _add(self, spec: Any, listener: socket.socket) -> None:
        try:
            if self.engine is None:
                raise MetaproxyError("add before configure")
            await self.engine.add(spec, sock=listener)
        except (MetaproxyError, OSError) as exc:
            listener.close()
            self._report({"op": "failed", "name": spec.name, "error": str(exc)})
            return
        self._report({"op": "added", "name": spec.name})

    async def _remove(self, name: str, drain: float | None) -> None:
        if self.engine is not None and name in self.engine:
            await self.engine.remove(name, drain=drain)
        self._report({"op": "removed", "name": name})

    # -- upstream ----------------------------------------------------------------------------

    async def _connect(self) -> socket.socket:
        """An agent connection from the manager (the pool's connect timeout bounds the wait)."""
        ident = next(self.ids)
        future: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self.waiting[ident] = future
        try:
            self._report({"op": "connect", "id": ident})
            return await future
        finally:
            self.waiting.pop(ident, None)

    # -- reports -----------------------------------------------------------------------------

    def _report(self, report: dict[str, Any]) -> None:
        try:
            channel.send_report(self.sock, report)
        except (BlockingIOError, OSError) as exc:
            # A manager that stopped reading is as good as gone.
            log.error("front worker: cannot report to the manager: %s", exc)
            self.done.set()

    async def _push_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            engine = self.engine
            if engine is None:
                continue
            names = engine.names()
            for start in range(0, len(names), _STATS_CHUNK):
                fronts = {}
                for name in names[start : start + _STATS_CHUNK]:
                    s = engine.stats(name)
                    fronts[name] = {
                        "requests": s.requests,
                        "errors": s.errors,
                        "last_error": (s.last_error or "")[:200],
                        "statuses": {str(k): v for k, v in s.statuses.items()},
                    }
                self._report({"op": "stats", "fronts": fronts})
