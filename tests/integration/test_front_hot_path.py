"""Performance contracts of the builtin front that the benchmark found broken (bench/, issue 7).

Each was a silent slowdown, not a functional failure: the requests still succeeded, so only a
count of connections or a listen queue shows it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metaproxy.config import FrontSpec, Identity
from metaproxy.front.builtin import BuiltinFront
from metaproxy.http.client import UpstreamPool

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
