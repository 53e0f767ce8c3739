"""The builtin engine with its fronts in an unprivileged worker process (the default under `up`).

The manager keeps what needs privilege or secrets — entering namespaces, the agent with the
shared secret, the store — and the worker (front/worker.py, forked from the zygote) parses
guest traffic with none of it:

- `start(spec)`: the manager opens the listener inside the namespace (as root) and sends it to
  the worker with the spec; it keeps its own copy, so a respawned worker gets it again and no
  connection waiting in the backlog is lost.
- the worker's upstream pool asks for agent connections (`connect`); the manager makes a
  socketpair, serves one end with the in-process agent (`AgentServer.accept`) and sends the
  other. The worker never needs the agent's socket file nor the state directory.
- a worker that dies (its channel ends) is respawned with backoff and given every listener again.

Nothing the worker says is trusted: reports are JSON, validated here, and `connect` requests
are capped (MAX_PENDING_CONNECTS) so a compromised worker cannot exhaust the manager's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from metaproxy.config import FrontSpec
from metaproxy.errors import MetaproxyError, ProcessError, UpstreamError
from metaproxy.front import channel
from metaproxy.front.builtin import EngineOptions, listen_spec
from metaproxy.front.netns import open_listener_async
from metaproxy.service.fronts import FrontStats
from metaproxy.service.zygote import Zygote

log = logging.getLogger(__name__)

ORDER_TIMEOUT = 30.0
MAX_PENDING_CONNECTS = 1024
BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)
STABLE_AFTER = 10.0  # a worker that served this long resets the backoff

Accept = Callable[[socket.socket], Awaitable[None]]  # AgentServer.accept


class _Worker:
    """One live worker: its channel, pid and what it last reported."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.uid: int | None = None
        self.ended = asyncio.Event()
        self.pending_connects = 0
        self.stats: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, asyncio.Future[str | None]] = {}


class WorkerEngine:
    """`FrontEngine` for builtin fronts served by one front worker (see the module docstring)."""

    kind = "builtin"

    def __init__(
        self,
        zygote: Zygote,
        accept: Accept,
        options: EngineOptions,
        *,
        uid: int | None,
        gid: int | None,
        log_level: str,
        log_target: str,
        drain: float = 0.0,
        fail: Callable[[str], None] | None = None,
    ) -> None:
        self.zygote = zygote
        self.fail = fail
        self.accept = accept
        self.options = options
        self.uid, self.gid = uid, gid
        self.log_level, self.log_target = log_level, log_target
        self.drain = drain
        self.respawns = 0
        self.listeners: dict[str, tuple[FrontSpec, socket.socket]] = {}
        self.worker: _Worker | None = None
        self._closing = False
        self._keeper: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self._started = asyncio.Event()
        self._lock = asyncio.Lock()

    # -- FrontEngine ---------------------------------------------------------------------------

    async def start(self, spec: FrontSpec) -> None:
        # Under the lock, the set of listeners and what the live worker serves change together:
        # a worker replaced meanwhile is given exactly the listeners registered at that moment.
        while True:
            worker = await self._live_worker()
            async with self._lock:
                if worker is not self.worker or worker.ended.is_set():
                    continue  # replaced while we waited for the lock
                listen = listen_spec(spec, freebind=self.options.freebind)
                sock = await open_listener_async(listen)
                self.listeners[spec.name] = (spec, sock)
                try:
                    await self._add(worker, spec, sock)
                except BaseException:
                    del self.listeners[spec.name]
                    sock.close()
                    raise
                return

    async def stop(self, name: str) -> None:
        async with self._lock:
            entry = self.listeners.pop(name, None)
            if entry is None:
                return
            worker = self.worker
            try:
                if worker is not None and not worker.ended.is_set():
                    order = {"op": "remove", "name": name, "drain": None}
                    await self._order(worker, name, order)
            finally:
                entry[1].close()

    def stats(self, name: str) -> FrontStats:
        worker = self.worker
        raw = worker.stats.get(name, {}) if worker is not None else {}
        return FrontStats(
            pid=worker.pid if worker is not None else None,
            requests=int(raw.get("requests", 0)),
            errors=int(raw.get("errors", 0)),
            last_error=str(raw.get("last_error", "")),
            respawns=self.respawns,
            statuses=dict(raw.get("statuses", {})),
        )

    async def close(self) -> None:
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        worker = self.worker
        if worker is not None and not worker.ended.is_set():
            with contextlib.suppress(OSError, channel.ChannelError):
                channel.send_order(worker.sock, {"op": "close", "drain": self.drain})
            try:
                async with asyncio.timeout(self.drain + 5.0):
                    await worker.ended.wait()
            except TimeoutError:
                log.warning("front worker %d did not stop; killing it", worker.pid)
                _kill(worker.pid)
                self._end(worker)
        for _, sock in self.listeners.values():
            sock.close()
        self.listeners.clear()

    # -- the worker ----------------------------------------------------------------------------

    async def _live_worker(self) -> _Worker:
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep())
        async with asyncio.timeout(ORDER_TIMEOUT):
            while True:
                await self._started.wait()
                worker = self.worker
                if worker is not None and not worker.ended.is_set():
                    return worker
                await asyncio.sleep(0.05)  # it just ended; the keeper is on it

    async def _keep(self) -> None:
        """Start the worker, and again whenever it ends, re-adding every listener."""
        failures = 0
        while not self._closing:
            if not self.zygote.alive():
                # Another zygote cannot be made (a fork of this process holds the secret):
                # the service has to start afresh.
                reason = "the front worker zygote is gone; no front worker can be started"
                if self.fail is not None:
                    self.fail(reason)
                    return
                log.critical("%s", reason)
            try:
                worker = await self._spawn()
            except (MetaproxyError, OSError) as exc:
                log.error("cannot start the front worker: %s", exc)
                await asyncio.sleep(BACKOFF[min(failures, len(BACKOFF) - 1)])
                failures += 1
                continue
            async with self._lock:
                self.worker = worker
                for spec, sock in list(self.listeners.values()):
                    try:
                        await self._add(worker, spec, sock)
                    except (MetaproxyError, TimeoutError) as exc:
                        log.error(
                            "front worker %d: cannot serve %s: %s", worker.pid, spec.name, exc
                        )
            self._started.set()
            born = asyncio.get_running_loop().time()
            await worker.ended.wait()
            self._started.clear()
            if self._closing:
                return
            self.respawns += 1
            lived = asyncio.get_running_loop().time() - born
            failures = failures + 1 if lived < STABLE_AFTER else 0
            delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
            log.error("front worker %d ended; starting another in %.1f s", worker.pid, delay)
            await asyncio.sleep(delay)

    async def _spawn(self) -> _Worker:
        ours, theirs = channel.pair()
        try:
            pid = await asyncio.to_thread(self.zygote.spawn, theirs, self.uid, self.gid)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(ours, pid)
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), self._readable, worker)
        ready = worker.replies["ready"] = loop.create_future()
        try:
            async with asyncio.timeout(ORDER_TIMEOUT):
                await ready
        except TimeoutError:
            _kill(pid)
            self._end(worker)
            raise ProcessError(f"front worker {pid} did not report ready") from None
        channel.send_order(
            ours,
            {
                "op": "configure",
                "options": self.options,
                "log_level": self.log_level,
                "log_target": self.log_target,
            },
        )
        log.info("front worker %d started (uid %s)", pid, worker.uid)
        return worker

    async def _add(self, worker: _Worker, spec: FrontSpec, sock: socket.socket) -> None:
        order = {"op": "add", "spec": spec}
        error = await self._order(worker, spec.name, order, [sock.fileno()])
        if error is not None:
            raise MetaproxyError(f"front worker: {error}")

    async def _order(
        self, worker: _Worker, name: str, order: dict[str, Any], fds: list[int] | None = None
    ) -> str | None:
        """Send an order about front `name` and wait for its reply: None or the error."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        worker.replies[name] = future
        try:
            channel.send_order(worker.sock, order, fds)
            async with asyncio.timeout(ORDER_TIMEOUT):
                return await future
        finally:
            if worker.replies.get(name) is future:
                del worker.replies[name]

    # -- the worker's reports ------------------------------------------------------------------

    def _readable(self, worker: _Worker) -> None:
        while not worker.ended.is_set():
            try:
                report = channel.receive_report(worker.sock)
            except BlockingIOError:
                return
            except (OSError, channel.ChannelError) as exc:
                log.error("front worker %d broke the channel (%s); stopping it", worker.pid, exc)
                _kill(worker.pid)
                report = None
            if report is None:
                self._end(worker)
                return
            try:
                self._heed(worker, report)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("front worker %d sent a bad %r report: %s", worker.pid, report, exc)
                _kill(worker.pid)
                self._end(worker)
                return

    def _heed(self, worker: _Worker, report: dict[str, Any]) -> None:
        op = report["op"]
        if op == "stats":
            fronts = report["fronts"]
            if not isinstance(fronts, dict):
                raise TypeError("fronts is not a mapping")
            # Only fronts we gave it: a worker inventing names must not grow our memory.
            for name, numbers in fronts.items():
                if name in self.listeners and isinstance(numbers, dict):
                    worker.stats[name] = numbers
        elif op == "connect":
            ident = report["id"]
            if not isinstance(ident, int):
                raise TypeError("connect id is not an integer")
            task = asyncio.get_running_loop().create_task(self._connect(worker, ident))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        elif op in ("added", "removed", "failed"):
            future = worker.replies.get(str(report["name"]))
            if future is not None and not future.done():
                future.set_result(None if op != "failed" else str(report.get("error", "failed")))
        elif op == "ready":
            worker.uid = int(report["uid"])
            future = worker.replies.get("ready")
            if future is not None and not future.done():
                future.set_result(None)
        else:
            raise ValueError(f"unknown op {op!r}")

    async def _connect(self, worker: _Worker, ident: int) -> None:
        """Answer a worker's `connect`: one end of a fresh pair served by the agent."""
        reply: dict[str, Any] = {"op": "upstream", "id": ident}
        if worker.pending_connects >= MAX_PENDING_CONNECTS:
            reply["error"] = "too many agent connections requested at once"
            self._send(worker, reply)
            return
        worker.pending_connects += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.accept(ours)
        except (UpstreamError, OSError) as exc:
            ours.close()
            reply["error"] = str(exc)
            self._send(worker, reply)
        else:
            self._send(worker, reply, [theirs.fileno()])
        finally:
            theirs.close()
            worker.pending_connects -= 1

    def _send(self, worker: _Worker, order: dict[str, Any], fds: list[int] | None = None) -> None:
        if worker.ended.is_set():
            return
        try:
            channel.send_order(worker.sock, order, fds)
        except (BlockingIOError, OSError, channel.ChannelError) as exc:
            log.error("front worker %d does not take orders (%s); stopping it", worker.pid, exc)
            _kill(worker.pid)
            self._end(worker)

    def _end(self, worker: _Worker) -> None:
        if worker.ended.is_set():
            return
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(worker.sock.fileno())
        worker.sock.close()
        for future in worker.replies.values():
            if not future.done():
                future.set_result("the front worker ended")
        worker.ended.set()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def worker_user(uid: int | None, gid: int | None) -> tuple[int | None, int | None]:
    """Who the worker runs as: [front] user/group, else nobody/nogroup when we are root."""
    if os.geteuid() != 0 or uid is not None:
        return uid, gid
    import grp
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
        uid, default_gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid, default_gid = 65534, 65534
    if gid is None:
        try:
            gid = grp.getgrnam("nogroup").gr_gid
        except KeyError:
            gid = default_gid
    return uid, gid
