"""Raw HTTP/1.1 over real sockets for front tests: exact bytes out, responses split by hand."""

from __future__ import annotations

import asyncio
import re
import socket

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\r$")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def status_of(response: bytes) -> int:
    match = _STATUS.match(response)
    if match is None:
        raise AssertionError(f"not an HTTP response: {response[:80]!r}")
    return int(match.group(1))


async def exchange(host: str, port: int, raw: bytes, *, timeout: float = 10) -> bytes:
    """Send `raw`, half-close nothing, and read until the server closes (bounded)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(raw)
            await writer.drain()
            return await reader.read(-1)
        finally:
            writer.close()


async def read_response(reader: asyncio.StreamReader, *, head_only: bool = False) -> bytes:
    """One Content-Length-framed response from a keep-alive connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    match = _LENGTH.search(head)
    length = int(match.group(1)) if match and not head_only else 0
    body = await reader.readexactly(length) if length else b""
    return head + body


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]
