"""The agent's upstream pool when it pipelines (agent.pipeline > 1), and its hot path's shape."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from metaproxy.agent.config import AgentConfig, UpstreamConfig, parse_metadata_url
from metaproxy.agent.server import AgentServer
from metaproxy.agent.upstream import Upstream, serialize_request, upstream_headers
from metaproxy.config import Secret
from metaproxy.metadata.records import PortMatch
from support.agentkit import FakePort, MemoryDirectory, raw_request, request_bytes

SECRET = "s3cr3t-Shared-Value"  # noqa: S105 (a test secret)
NET = "net-a"
INSTANCE = "11111111-2222-3333-4444-555555555555"
PROJECT = "proj-1"
CLIENT_IP = "169.254.10.2"
MAC = "fa:16:3e:00:00:01"


def ident() -> list[tuple[str, str]]:
    return [("X-Neutron-Network-ID", NET), ("X-Forwarded-For", CLIENT_IP)]


def make_config(short_tmp: Path, url: str, **upstream: object) -> AgentConfig:
    return AgentConfig(
        shared_secret=Secret(SECRET),
        socket_path=short_tmp / "run" / "agent.sock",
        socket_mode="user",
        upstream=UpstreamConfig(**parse_metadata_url(url), **upstream),  # type: ignore[arg-type]
    )


@pytest.fixture
def directory() -> MemoryDirectory:
    return MemoryDirectory(ports=[FakePort("port-1", NET, INSTANCE, PROJECT, CLIENT_IP, MAC)])


@dataclass
class Upstream1:
    """A Unix-socket server that sees raw reads: answers each request with its own target,
    echoing its X-Metaproxy-Seq as the embedded metadata server does."""

    path: Path
    reads: list[list[bytes]] = field(default_factory=list)  # per connection: request lines
    close_after: int = 0  # answer this many on a connection, then close (0: never)
    delay: float = 0.0
    silent: bool = False  # read, never answer
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        buffer = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buffer += data
                lines = []
                seqs = []
                while b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    line = head.split(b"\r\n", 1)[0]
                    seq = [f for f in head.split(b"\r\n") if f.startswith(b"X-Metaproxy-Seq: ")]
                    seqs.append(seq[0][17:] if seq else None)
                    if line.startswith((b"POST", b"PUT")):
                        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                        buffer = buffer[length:]
                    lines.append(line)
                self.reads.append(lines)
                if self.silent:
                    continue
                await asyncio.sleep(self.delay)
                for line, seq in zip(lines, seqs, strict=True):
                    target = line.split(b" ")[1]
                    answered += 1
                    last = self.close_after and answered >= self.close_after
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                        + (b"X-Metaproxy-Seq: %s\r\n" % seq if seq else b"")
                        + (b"Connection: close\r\n" if last else b"")
                        + b"Content-Length: %d\r\n\r\n" % len(target)
                        + target
                    )
                    if last:
                        await writer.drain()
                        return
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def upstream(short_tmp: Path) -> AsyncIterator[Upstream1]:
    up = Upstream1(short_tmp / "up.sock")
    server = await asyncio.start_unix_server(up.handle, str(up.path))
    try:
        yield up
    finally:
        server.close()


async def _get_all(agent: AgentServer, targets: list[str]) -> list[tuple[int, bytes]]:
    answers = await asyncio.gather(
        *(raw_request(agent.socket_path, request_bytes(ident(), target=t)) for t in targets)
    )
    return [(a.status, a.body) for a in answers]


async def test_pipelined_gets_are_answered_each_with_its_own_answer(
    short_tmp: Path, directory: MemoryDirectory, upstream: Upstream1
) -> None:
    config = make_config(short_tmp, f"unix:{upstream.path}", pipeline=8)
    targets = [f"/latest/meta-data/n{i}" for i in range(24)]
    async with AgentServer(config, directory) as agent, asyncio.timeout(20):
        # The first answer shows the server echoes sequence numbers; then requests share.
        assert await _get_all(agent, ["/first"]) == [(200, b"/first")]
        answers = await _get_all(agent, targets)
    assert answers == [(200, t.encode()) for t in targets]
    # Fewer connections than requests: they queued behind each other (at most 8 per connection).
    assert upstream.connections <= 1 + len(targets) // 8
    assert max(len(lines) for lines in upstream.reads) > 1


async def test_a_close_in_the_middle_of_a_pipeline_sends_the_rest_again(
    short_tmp: Path, directory: MemoryDirectory, upstream: Upstream1
) -> None:
    upstream.close_after = 1
    upstream.delay = 0.05  # let several requests queue on the first connection
    config = make_config(short_tmp, f"unix:{upstream.path}", pipeline=8)
    targets = [f"/t{i}" for i in range(4)]
    async with AgentServer(config, directory) as agent, asyncio.timeout(20):
        answers = await _get_all(agent, targets)
    assert answers == [(200, t.encode()) for t in targets]


async def test_post_put_and_head_are_never_pipelined(
    short_tmp: Path, directory: MemoryDirectory, upstream: Upstream1
) -> None:
    upstream.delay = 0.05
    config = make_config(short_tmp, f"unix:{upstream.path}", pipeline=8)
    async with AgentServer(config, directory) as agent, asyncio.timeout(20):
        requests = [request_bytes(ident(), target=f"/g{i}") for i in range(6)]
        requests.insert(2, request_bytes(ident(), method="POST", target="/p", body=b"pw"))
        requests.insert(4, request_bytes(ident(), method="HEAD", target="/h"))
        answers = await asyncio.gather(*(raw_request(agent.socket_path, r) for r in requests))
    assert [a.status for a in answers] == [200] * len(requests)
    for connection_reads in upstream.reads:
        for line in connection_reads:
            if line.startswith((b"POST", b"HEAD")):
                assert connection_reads == [line], upstream.reads


async def test_a_silent_server_times_every_pipelined_request_out(
    short_tmp: Path, directory: MemoryDirectory, upstream: Upstream1
) -> None:
    upstream.silent = True
    config = make_config(short_tmp, f"unix:{upstream.path}", pipeline=8, timeout=1.0)
    async with AgentServer(config, directory) as agent, asyncio.timeout(20):
        started = asyncio.get_running_loop().time()
        answers = await _get_all(agent, [f"/s{i}" for i in range(5)])
        elapsed = asyncio.get_running_loop().time() - started
    assert [status for status, _ in answers] == [504] * 5
    assert elapsed < 3.0


async def test_a_warm_request_creates_no_task(
    short_tmp: Path, directory: MemoryDirectory, upstream: Upstream1
) -> None:
    """The hot path is callbacks only: no asyncio task per request once connections exist."""
    config = make_config(short_tmp, f"unix:{upstream.path}")
    loop = asyncio.get_running_loop()
    created: list[object] = []
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: object, **kwargs: object) -> object:
        created.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)  # type: ignore[arg-type]

    async with AgentServer(config, directory) as agent, asyncio.timeout(20):
        reader, writer = await asyncio.open_unix_connection(str(agent.socket_path))
        one = request_bytes(ident()).replace(b"Connection: close\r\n", b"")
        try:
            writer.write(one)
            await reader.readuntil(b"\r\n\r\n")  # the upstream connection now exists
            await reader.readexactly(len("/latest/meta-data/instance-id"))
            loop.set_task_factory(factory)  # type: ignore[arg-type]
            try:
                for _ in range(20):
                    writer.write(one)
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200")
                    await reader.readexactly(len("/latest/meta-data/instance-id"))
            finally:
                loop.set_task_factory(previous)
        finally:
            writer.close()
    assert created == []


@pytest.mark.parametrize(
    "relayed",
    [
        (),
        ((b"accept", b"*/*"),),
        ((b"accept", b"a"), (b"content-type", b"t"), (b"accept", b"second")),
        (
            (b"x-aws-ec2-metadata-token", b"t\xe9\xff"),
            (b"x-aws-ec2-metadata-token-ttl-seconds", b"9"),
        ),
    ],
)
@pytest.mark.parametrize(("method", "body"), [("GET", b""), ("PUT", b""), ("POST", b"pw")])
async def test_fast_encoding_is_serialize_request_byte_for_byte(
    short_tmp: Path, relayed: tuple[tuple[bytes, bytes], ...], method: str, body: bytes
) -> None:
    config = make_config(short_tmp, "unix:/nowhere.sock")
    up = Upstream(config.upstream, Secret(SECRET))
    match = PortMatch("port-1", NET, INSTANCE, PROJECT)
    for _ in range(2):  # the second time from the cache of signed lines
        data = up._encode(method, "/openstack/latest/x?y=1", relayed, body, match, CLIENT_IP)
        client = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in relayed]
        expected = serialize_request(
            method,
            "/openstack/latest/x?y=1",
            b"localhost",
            upstream_headers(client, match, CLIENT_IP, Secret(SECRET)),
            body,
        )
        assert data == expected
    signature = hmac.new(SECRET.encode(), INSTANCE.encode(), hashlib.sha256).hexdigest()
    assert b"X-Instance-ID-Signature: " + signature.encode() + b"\r\n" in data
