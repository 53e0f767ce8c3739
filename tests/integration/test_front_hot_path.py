"""Performance contracts of the builtin front that the benchmark found broken (bench/, issue 7).

Each was a silent slowdown, not a functional failure: the requests still succeeded, so only a
count of connections or a listen queue shows it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from metaproxy.config import FrontSpec, Identity
from metaproxy.front.builtin import BuiltinFront, EngineOptions
from metaproxy.http.client import UpstreamPool
from support.rawhttp import free_port, read_response, status_of
from support.recorder import Recorder

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
REQUEST = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n"


class Backend:
    """A keep-alive Unix-socket HTTP backend that counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def backend(short_tmp: Path) -> AsyncIterator[tuple[Backend, Path]]:
    path = short_tmp / "agent.sock"
    counting = Backend()
    server = await asyncio.start_unix_server(counting.handle, str(path), backlog=1024)
    try:
        yield counting, path
    finally:
        server.close()
        await server.wait_closed()


async def test_pool_reuses_one_connection_for_sequential_requests(
    backend: tuple[Backend, Path],
) -> None:
    # llhttp forgets keep-alive once a message completes: asking should_keep_alive() after
    # the response ended said False, and every request opened a new Unix-socket connection.
    counting, path = backend
    pool = UpstreamPool(str(path))
    try:
        async with asyncio.timeout(10):
            for _ in range(5):
                response = await pool.request(REQUEST)
                assert (response.status, response.body, response.keep_alive) == (200, b"ok", True)
    finally:
        await pool.close()
    assert counting.accepted == 1


async def test_pool_keeps_a_burst_of_connections_for_the_next_burst(
    backend: tuple[Backend, Path],
) -> None:
    # A boot storm keeps hundreds of requests in flight; closing all but a few idle
    # connections after each burst made the next burst reconnect (the agent's accept loop).
    counting, path = backend
    pool = UpstreamPool(str(path))
    try:
        async with asyncio.timeout(20):
            for _ in range(2):
                answers = await asyncio.gather(*(pool.request(REQUEST) for _ in range(300)))
                assert {r.status for r in answers} == {200}
    finally:
        await pool.close()
    assert counting.accepted == 300


def _listen_backlog(port: int) -> int:
    """Send-Q of a listening TCP socket, as `ss` shows it, is its accept-queue limit."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    return int(out[2])


async def test_front_listens_with_its_configured_backlog(short_tmp: Path) -> None:
    # asyncio's create_server(sock=...) calls listen() again with its own default (100):
    # a boot storm of a few hundred instances then lost SYNs and waited 1 s, 3 s, 7 s.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = FrontSpec(
        identity=Identity("network", "net-backlog"),
        upstream_socket=short_tmp / "agent.sock",
        bind_address="127.0.0.1",
        port=port,
        state_path=short_tmp,
    )
    engine = BuiltinFront()
    await engine.add(spec)
    try:
        assert _listen_backlog(port) == min(spec.maxconn, 4096)
    finally:
        await engine.close()


def _from_metaproxy(callback: object) -> bool:
    func = getattr(callback, "__func__", callback)
    return str(getattr(func, "__module__", "")).startswith("metaproxy")


async def test_keep_alive_requests_make_no_task_or_timer_each(
    recorder: Recorder, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Task, a Future and a TimerHandle per request (a coroutine per exchange, call_later for
    # the server timeout) cost about a third of the front's CPU. Requests on warm keep-alive
    # connections must be served by callbacks alone; deadlines are swept periodically.
    loop = asyncio.get_running_loop()
    tasks: list[str] = []
    timers: dict[int, asyncio.TimerHandle] = {}  # by id; the handles stay alive, ids unique
    default_factory = loop.get_task_factory()

    def counting_factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Future[Any]:
        if coro.cr_code.co_filename.find("metaproxy") >= 0:
            tasks.append(coro.__qualname__)
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    def counting(name: str) -> Callable[..., asyncio.TimerHandle]:
        schedule = getattr(loop, name)

        def wrapper(when: float, callback: Callable[..., object], *args: Any, **kw: Any) -> Any:
            handle = schedule(when, callback, *args, **kw)
            if _from_metaproxy(callback):
                timers[id(handle)] = handle
            return handle

        return wrapper

    spec = FrontSpec(
        identity=Identity("network", "net-hot"),
        upstream_socket=recorder.path,
        bind_address="127.0.0.1",
        port=free_port(),
        state_path=short_tmp,
    )
    engine = BuiltinFront(EngineOptions(access_log=False))
    await engine.add(spec)
    clients = [await asyncio.open_connection("127.0.0.1", spec.port) for _ in range(4)]
    try:
        async with asyncio.timeout(60):
            # Warm up: four requests at once open four pooled agent connections.
            for _, writer in clients:
                writer.write(REQUEST)
            for reader, _ in clients:
                assert status_of(await read_response(reader)) == 200
            loop.set_task_factory(counting_factory)
            monkeypatch.setattr(loop, "call_at", counting("call_at"))
            monkeypatch.setattr(loop, "call_later", counting("call_later"))
            started = time.monotonic()
            for _ in range(50):
                for _, writer in clients:
                    writer.write(REQUEST)
                for reader, _ in clients:
                    assert status_of(await read_response(reader)) == 200
            elapsed = time.monotonic() - started
            loop.set_task_factory(default_factory)
            monkeypatch.undo()
    finally:
        for _, writer in clients:
            writer.close()
        await engine.close()
    assert tasks == []
    # Only the periodic deadline sweep may schedule timers: a few per second, not per request.
    assert len(timers) <= 4 + 10 * elapsed, (len(timers), elapsed)
