"""A lying upstream behind a pipelining client: no instance may ever get another's answer.

The builtin front pipelines GETs of different instances on one agent connection, and the agent
pipelines them to the embedded metadata server; an answer is matched to its request by
position. Every request carries `X-Metaproxy-Seq`, which metaproxy's agent and metadata server
echo; here a scripted upstream breaks that contract every way it can (answers
out of order, wrong or missing numbers, interim answers, answers nobody asked for, a close in
the middle of a batch), and every request's path is unique, so a mixed-up answer shows as a
body that names another path. The rule under attack: each answer is its own request's, or it
is a 502. The honest modes show that pipelining does happen (several requests in flight on one
connection) and that an agent that never echoes (Neutron's) is never sent more than one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from metaproxy.agent.client import HttpPool
from metaproxy.config import FrontSpec, Identity
from metaproxy.errors import UpstreamError
from metaproxy.front.builtin import BuiltinFront, EngineOptions
from metaproxy.http.client import UpstreamPool
from support.rawhttp import body_of, free_port, read_response, status_of

_SEQ = re.compile(rb"\r\nX-Metaproxy-Seq: ([0-9]+)\r\n", re.IGNORECASE)
_TARGET = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.1\r\n")

HONEST = ("echo", "noecho", "close-midway")
LYING = ("reorder", "wrong-number", "stops-echoing", "interim", "unasked", "garbage-midway")


@dataclass
class ScriptedAgent:
    """Answers each read's requests together, as `mode` says (see the module doc)."""

    mode: str
    path: Path
    most_in_flight: int = 0  # requests one connection carried at once
    answered: int = 0
    closed_midway: bool = False
    heads_shared: int = 0  # batches in which a HEAD was not alone
    heads: set[bytes] = field(default_factory=set)  # targets requested with HEAD
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def answer(self, target: bytes, seq: bytes | None, close: bool = False) -> bytes:
        body = b"answer for " + target
        fields = [b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(body)]
        if seq is not None:
            fields.append(b"X-Metaproxy-Seq: " + seq)
        if close:
            fields.append(b"Connection: close")
        head = b"\r\n".join(fields) + b"\r\n\r\n"
        return head if target in self.heads else head + body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        done = 0  # answers sent on this connection
        try:
            while chunk := await reader.read(65536):
                buf += chunk
                batch = []
                while (end := buf.find(b"\r\n\r\n")) >= 0:
                    head, buf = buf[: end + 4], buf[end + 4 :]
                    line = _TARGET.match(head)
                    seq = _SEQ.search(head)
                    assert line is not None
                    if line.group(1) == b"HEAD":
                        self.heads.add(line.group(2))
                    batch.append((line.group(2), seq.group(1) if seq else None))
                if not batch:
                    continue
                if len(batch) > 1 and any(target in self.heads for target, _ in batch):
                    self.heads_shared += 1
                self.most_in_flight = max(self.most_in_flight, len(batch))
                await asyncio.sleep(0.01)  # let more requests queue up behind these
                out, close = self._script(batch, done)
                done += len(batch)
                self.answered += len(batch)
                writer.write(out)
                await writer.drain()
                if close:
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _script(self, batch: list[tuple[bytes, bytes | None]], done: int) -> tuple[bytes, bool]:
        mode = self.mode
        first = done == 0  # the connection's first answer: the one that shows it echoes
        if mode == "noecho":
            return b"".join(self.answer(t, None) for t, _ in batch), False
        if mode == "reorder" and len(batch) > 1:
            return b"".join(self.answer(t, s) for t, s in reversed(batch)), False
        if mode == "wrong-number" and not first:
            return b"".join(self.answer(t, b"%d" % (int(s or 0) + 1)) for t, s in batch), False
        if mode == "stops-echoing" and not first:
            return b"".join(self.answer(t, None) for t, _ in batch), False
        if mode == "interim" and not first:
            return b"HTTP/1.1 100 Continue\r\n\r\n" + self.answer(*batch[0]), False
        if mode == "unasked" and len(batch) > 1:
            # A second answer to the first request, where the second's answer belongs.
            rest = b"".join(self.answer(t, s) for t, s in batch[1:])
            return self.answer(*batch[0]) + self.answer(b"/nobody", batch[0][1]) + rest, False
        if mode == "garbage-midway" and len(batch) > 1:
            return self.answer(*batch[0]) + b"HTTP/1.1 2OO OK\r\n\r\n", False
        if mode == "close-midway" and len(batch) > 1 and not self.closed_midway:
            # Answers the first and says close (once): the rest must be sent again elsewhere.
            self.closed_midway = True
            return self.answer(*batch[0], close=True), True
        return b"".join(self.answer(t, s) for t, s in batch), False


@pytest.fixture(params=HONEST + LYING)
async def agent(request: pytest.FixtureRequest, short_tmp: Path) -> AsyncIterator[ScriptedAgent]:
    scripted = ScriptedAgent(request.param, short_tmp / "agent.sock")
    await scripted.start()
    try:
        yield scripted
    finally:
        await scripted.stop()


def judge(agent: ScriptedAgent, outcomes: dict[bytes, bytes | int]) -> None:
    """Every outcome is its own answer or a 502; the honest modes answer everything."""
    mixed = {t: o for t, o in outcomes.items() if isinstance(o, bytes) and o != b"answer for " + t}
    assert mixed == {}, f"answers handed to the wrong request: {mixed}"
    failed = {t: o for t, o in outcomes.items() if not isinstance(o, bytes)}
    assert set(failed.values()) <= {502}, failed
    if agent.mode in HONEST:
        assert failed == {}
    else:
        # The lie was told and caught (not merely never reached).
        assert failed, "the scripted agent never got to lie"
    assert agent.heads_shared == 0, "a HEAD shared a connection with other requests"
    if agent.mode == "close-midway":
        assert agent.closed_midway, "the connection was never closed in the middle of a batch"
    if agent.mode == "noecho":
        assert agent.most_in_flight == 1, "a request was pipelined to an agent that never echoes"
    elif agent.mode == "echo":
        assert agent.most_in_flight > 1, "nothing was pipelined"


class FrontPool:
    """The builtin front's agent client."""

    def __init__(self, path: Path) -> None:
        self.pool = UpstreamPool(str(path), depth=8, server_timeout=5)

    async def fetch(self, raw: bytes, head: bool) -> bytes:
        response = await self.pool.request(raw, head=head, pipelined=not head)
        return response.body

    async def close(self) -> None:
        await self.pool.close()


class AgentPool:
    """The agent's metadata-server client."""

    def __init__(self, path: Path) -> None:
        self.pool = HttpPool.unix(str(path), limit=64, connect_timeout=5, depth=8)

    async def fetch(self, raw: bytes, head: bool) -> bytes:
        method = "HEAD" if head else "GET"
        answer = await self.pool.request(raw, head=head, timeout=5, method=method)
        if answer.status != 200:
            raise UpstreamError(f"status {answer.status}", status_hint=answer.status)
        return answer.body

    async def close(self) -> None:
        await self.pool.close()


@pytest.mark.parametrize("client", [FrontPool, AgentPool], ids=["front-pool", "agent-pool"])
async def test_pool_never_hands_an_answer_to_the_wrong_request(
    agent: ScriptedAgent, client: type[FrontPool | AgentPool]
) -> None:
    pool = client(agent.path)
    outcomes: dict[bytes, bytes | int] = {}

    async def get(target: bytes) -> None:
        # Every tenth a HEAD, which must go alone on a connection (its answer has no body).
        head = target.endswith(b"0")
        raw = b"%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (b"HEAD" if head else b"GET", target)
        try:
            body = await pool.fetch(raw, head)
            outcomes[target] = b"answer for " + target if head else body
        except UpstreamError as exc:
            outcomes[target] = exc.status_hint

    try:
        async with asyncio.timeout(30):
            # Waves: the first opens connections, which echo; the later ones pipeline on them.
            for wave in range(4):
                await asyncio.gather(*(get(b"/w%d/r%d" % (wave, i)) for i in range(40)))
    finally:
        await pool.close()
    assert len(outcomes) == 160
    judge(agent, outcomes)


async def test_front_never_relays_an_answer_to_the_wrong_instance(
    agent: ScriptedAgent, short_tmp: Path
) -> None:
    spec = FrontSpec(
        identity=Identity("network", "net-1"),
        upstream_socket=agent.path,
        bind_address="127.0.0.1",
        port=free_port(),
        state_path=short_tmp,
    )
    engine = BuiltinFront(EngineOptions(pipeline=8))
    await engine.add(spec)
    outcomes: dict[bytes, bytes | int] = {}

    async def client(name: int) -> None:
        # One keep-alive connection per "instance", several requests each.
        reader, writer = await asyncio.open_connection("127.0.0.1", spec.port)
        try:
            for i in range(6):
                target = b"/c%d/r%d" % (name, i)
                writer.write(b"GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n" % target)
                response = await read_response(reader)
                status = status_of(response)
                outcomes[target] = body_of(response) if status == 200 else status
                if b"Connection: close" in response:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", spec.port)
        finally:
            writer.close()

    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(client(n) for n in range(24)))
    finally:
        await engine.close()
    assert len(outcomes) == 24 * 6
    judge(agent, outcomes)


async def test_a_head_never_joins_a_connection_with_gets_in_flight(short_tmp: Path) -> None:
    """The connection GETs were last pipelined on goes idle; the next round's GET takes it
    again, and a HEAD submitted right after must not be put on it too (a HEAD's answer ends at
    its head, so the answers behind it could not be read)."""
    agent = ScriptedAgent("echo", short_tmp / "agent.sock")
    await agent.start()
    pool = UpstreamPool(str(agent.path), depth=4, server_timeout=5)
    try:
        async with asyncio.timeout(20):
            for warm in (b"/a", b"/a2"):  # opens the connection, then pipelines on it
                first = await pool.request(
                    b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % warm, pipelined=True
                )
                assert first.body == b"answer for " + warm
            get, head = await asyncio.gather(
                pool.request(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n", pipelined=True),
                pool.request(b"HEAD /c HTTP/1.1\r\nHost: x\r\n\r\n", head=True),
            )
    finally:
        await pool.close()
        await agent.stop()
    assert (get.body, head.status) == (b"answer for /b", 200)
    assert agent.heads_shared == 0
