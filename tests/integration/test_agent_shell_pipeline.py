"""The agent's HTTP shell with pipelined requests: each answer echoes its request's sequence
number, GETs are worked on together, answers go out strictly in order, and a request with side
effects is never worked on alongside another of its connection.

The handler here is a test double that holds every request until the test answers it, in
whatever order the test picks: that is what a slow Nova does to the real handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from metaproxy.agent.protocol import AgentProtocol, Request
from metaproxy.agent.upstream import Reply

Answer = Callable[[Reply], None]


class Held:
    """Requests the shell handed over, with the callbacks that answer them."""

    def __init__(self) -> None:
        self.requests: list[tuple[Request, Answer]] = []
        self.changed = asyncio.Event()

    def handler(self, request: Request, answer: Answer) -> None:
        self.requests.append((request, answer))
        self.changed.set()

    def targets(self) -> list[str]:
        return [request.target for request, _ in self.requests]

    async def until(self, count: int) -> None:
        while len(self.requests) < count:
            self.changed.clear()
            await self.changed.wait()

    def answer(self, target: str) -> None:
        for request, answer in self.requests:
            if request.target == target:
                answer(Reply(200, f"answer to {target}".encode()))
                return
        raise AssertionError(f"{target} was never handed over")


@pytest.fixture
async def shell(short_tmp: Path) -> AsyncIterator[tuple[Held, Path]]:
    held = Held()
    connections: set[AgentProtocol] = set()
    path = short_tmp / "agent.sock"
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: AgentProtocol(held.handler, connections, max_head=8192, max_body=65536),
        str(path),
    )
    try:
        yield held, path
    finally:
        server.close()
        for conn in list(connections):
            conn.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def connected(
    path: Path,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection to the shell for at most 10 s, closed afterwards."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            yield reader, writer
        finally:
            writer.close()


def request(target: str, seq: int | None, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    if seq is not None:
        lines.append(f"X-Metaproxy-Seq: {seq}")
    if method == "PUT":
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[tuple[bytes, bytes]]:
    """(X-Metaproxy-Seq or b"", body) of the next `count` answers."""
    answers = []
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        fields = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:-2])
        )
        body = await reader.readexactly(int(fields[b"content-length"]))
        answers.append((fields.get(b"x-metaproxy-seq", b""), body))
    return answers


async def test_gets_are_worked_on_together_and_answered_in_order(
    shell: tuple[Held, Path],
) -> None:
    held, path = shell
    async with connected(path) as (reader, writer):
        writer.write(request("/a", 7) + request("/b", 8) + request("/c", 9))
        # All three reach the handler before any is answered: a slow first one does not
        # hold up the work on the others.
        await held.until(3)
        assert held.targets() == ["/a", "/b", "/c"]
        held.answer("/c")
        held.answer("/b")
        # Nothing may overtake the first answer.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        held.answer("/a")
        answers = await read_answers(reader, 3)
    assert answers == [
        (b"7", b"answer to /a"),
        (b"8", b"answer to /b"),
        (b"9", b"answer to /c"),
    ]


async def test_a_request_without_a_number_gets_none_back(shell: tuple[Held, Path]) -> None:
    held, path = shell
    async with connected(path) as (reader, writer):
        writer.write(request("/plain", None))
        await held.until(1)
        held.answer("/plain")
        assert await read_answers(reader, 1) == [(b"", b"answer to /plain")]


async def test_a_put_waits_for_what_is_before_it_and_holds_what_is_after_it(
    shell: tuple[Held, Path],
) -> None:
    held, path = shell
    async with connected(path) as (reader, writer):
        writer.write(
            request("/before", 1)
            + request("/latest/api/token", 2, method="PUT")
            + request("/after", 3)
        )
        await held.until(1)
        await asyncio.sleep(0.05)
        assert held.targets() == ["/before"]  # the PUT waits for /before's answer
        held.answer("/before")
        await held.until(2)
        await asyncio.sleep(0.05)
        assert held.targets() == ["/before", "/latest/api/token"]  # /after waits for it
        held.answer("/latest/api/token")
        await held.until(3)
        held.answer("/after")
        answers = await read_answers(reader, 3)
    assert [seq for seq, _ in answers] == [b"1", b"2", b"3"]


@pytest.mark.parametrize(
    "field",
    [
        b"X-Metaproxy-Seq: 1\r\nX-Metaproxy-Seq: 2\r\n",  # two numbers: which to echo?
        b"X-Metaproxy-Seq: 1a\r\n",
        b"X-Metaproxy-Seq: -1\r\n",
        b"X-Metaproxy-Seq: " + b"9" * 21 + b"\r\n",
    ],
    ids=["twice", "not-digits", "negative", "too-long"],
)
async def test_a_bad_number_is_400_and_never_handed_over(
    shell: tuple[Held, Path], field: bytes
) -> None:
    held, path = shell
    async with connected(path) as (reader, writer):
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n" + field + b"\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"x-metaproxy-seq" not in head.lower()
    assert held.requests == []
