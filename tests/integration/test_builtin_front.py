"""The builtin engine on real loopback sockets, in front of a recording Unix-socket backend."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from metaproxy.config import FrontSpec, Identity, Timeouts
from metaproxy.front.builtin import BuiltinFront, EngineOptions
from metaproxy.front.ratelimit import RateLimitConfig
from support.front_cases import REFUSALS, head
from support.rawhttp import body_of, exchange, free_port, read_response, status_of
from support.recorder import Recorder

HOST = "127.0.0.1"


def make_spec(socket: Path, state: Path, **changes: object) -> FrontSpec:
    spec = FrontSpec(
        identity=Identity("network", "net-1"),
        upstream_socket=socket,
        bind_address=HOST,
        port=free_port(),
        state_path=state,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def engine() -> AsyncIterator[BuiltinFront]:
    front = BuiltinFront()
    try:
        yield front
    finally:
        await front.close()


@pytest.fixture
async def served(engine: BuiltinFront, recorder: Recorder, short_tmp: Path) -> FrontSpec:
    spec = make_spec(recorder.path, short_tmp)
    await engine.add(spec)
    return spec


@pytest.mark.parametrize(("raw", "status"), REFUSALS)
async def test_refusal_on_the_wire_reaches_nobody(
    served: FrontSpec, recorder: Recorder, raw: bytes, status: int
) -> None:
    response = await exchange(HOST, served.port, raw)
    assert status_of(response) == status
    assert b"Connection: close" in response
    assert recorder.requests == []


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GET / HTTP/1.1\nHost: a\n", id="bare-lf-unterminated"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00", id="nul-unterminated"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n b", id="obs-fold-unterminated"),
    ],
)
async def test_bad_bytes_are_refused_before_the_head_ends(
    served: FrontSpec, recorder: Recorder, raw: bytes
) -> None:
    """No waiting for a blank line that a bare-LF client will never send."""
    response = await exchange(HOST, served.port, raw, timeout=5)
    assert status_of(response) == 400
    assert recorder.requests == []


async def test_oversized_head_without_end_is_431(served: FrontSpec, recorder: Recorder) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 9000
    assert status_of(await exchange(HOST, served.port, raw)) == 431
    assert recorder.requests == []


async def test_oversized_body_is_413_without_reading_it(
    served: FrontSpec, recorder: Recorder
) -> None:
    raw = head("Host: a", "Content-Length: 70000", request_line="POST / HTTP/1.1")
    assert status_of(await exchange(HOST, served.port, raw)) == 413
    assert recorder.requests == []


async def test_padded_request_carries_only_the_true_identity(
    served: FrontSpec, recorder: Recorder
) -> None:
    for pad in (3900, 4090, 6000, 8000):
        lines = [
            "Host: 169.254.169.254",
            "X-Pad: " + "p" * (pad - 200),
            "X-Forwarded-For: 169.254.66.66",
            "X-Neutron-Network-ID: evil-net",
            "X-Neutron-Router-ID: evil-router",
            "X-Instance-ID: evil",
            "Connection: close",
        ]
        response = await exchange(HOST, served.port, head(*lines))
        assert status_of(response) == 200, response[:100]
    assert len(recorder.requests) == 4
    for seen in recorder.requests:
        assert seen.values("X-Neutron-Network-ID") == ["net-1"]
        assert seen.values("X-Forwarded-For") == ["127.0.0.1"]
        assert seen.values("X-Neutron-Router-ID") == []
        assert seen.values("X-Instance-ID") == []
        assert seen.values("X-Pad") == []


async def test_keep_alive_and_pipelining_answer_in_order(
    served: FrontSpec, recorder: Recorder
) -> None:
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        paths = [f"/latest/meta-data/{i}" for i in range(5)]
        writer.write(b"".join(head("Host: a", request_line=f"GET {p} HTTP/1.1") for p in paths))
        async with asyncio.timeout(10):
            for _ in paths:
                response = await read_response(reader)
                assert status_of(response) == 200
                assert body_of(response) == b"recorded\n"
            writer.write(head("Host: a", request_line="GET /again HTTP/1.1"))
            assert status_of(await read_response(reader)) == 200
    finally:
        writer.close()
    assert [r.target for r in recorder.requests] == [*paths, "/again"]


async def test_a_refusal_behind_pipelined_requests_comes_after_their_answers(
    served: FrontSpec, recorder: Recorder
) -> None:
    raw = (
        head("Host: a", request_line="GET /a HTTP/1.1")
        + head("Host: a", request_line="GET /b HTTP/1.1")
        + head("Host: a", request_line="TRACE / HTTP/1.1")
    )
    data = await exchange(HOST, served.port, raw)
    assert [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)] == [200, 200, 405]
    assert data.endswith(b"Method Not Allowed\n")
    assert [r.target for r in recorder.requests] == ["/a", "/b"]


async def test_a_screened_head_is_kept_per_front_bounded_and_same_as_fresh(
    engine: BuiltinFront, recorder: Recorder, short_tmp: Path
) -> None:
    """A head seen before is not parsed again (`_Front.remember`): the agent gets the same
    request, refusals are never kept, no front sees another's, and a guest sending ever new
    heads cannot grow it."""
    a = make_spec(recorder.path, short_tmp / "a")
    b = make_spec(recorder.path, short_tmp / "b", identity=Identity("network", "net-2"))
    await engine.add(a)
    await engine.add(b)
    get = head("Host: 169.254.169.254", "User-Agent: Cloud-Init/23.1")
    post = head(
        "Host: a", "Content-Length: 5", request_line="POST /openstack/latest/password HTTP/1.1"
    )
    reader, writer = await asyncio.open_connection(HOST, a.port)
    try:
        async with asyncio.timeout(20):
            for raw in (get, get, post + b"first", post + b"again"):
                writer.write(raw)
                assert status_of(await read_response(reader)) == 200
            for i in range(200):  # ever new heads
                writer.write(head("Host: a", request_line=f"GET /n/{i} HTTP/1.1"))
                assert status_of(await read_response(reader)) == 200
            writer.write(get)
            assert status_of(await read_response(reader)) == 200
    finally:
        writer.close()
    refused = await exchange(HOST, a.port, head("Host: a", request_line="TRACE / HTTP/1.1"))
    assert status_of(refused) == 405

    def sent(index: int) -> list[tuple[str, str]]:
        return [(k, v) for k, v in recorder.requests[index].headers if k != "X-Metaproxy-Seq"]

    assert sent(0) == sent(1) == sent(-1)  # kept, evicted and parsed again: the same request
    assert [r.body for r in recorder.requests[2:4]] == [b"first", b"again"]
    front_a = engine._fronts[a.name]
    assert 0 < len(front_a.screened) <= 64
    assert not any(raw.startswith(b"TRACE") for raw in front_a.screened)
    assert engine._fronts[b.name].screened == {}


async def test_head_and_post_are_relayed(served: FrontSpec, recorder: Recorder) -> None:
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        async with asyncio.timeout(10):
            writer.write(head("Host: a", request_line="HEAD /latest HTTP/1.1"))
            response = await read_response(reader, head_only=True)
            assert status_of(response) == 200
            assert b"Content-Length: 9\r\n" in response
            body = b'{"password": "x"}'
            writer.write(
                head(
                    "Host: a",
                    "Content-Type: application/json",
                    f"Content-Length: {len(body)}",
                    request_line="POST /openstack/latest/password HTTP/1.1",
                )
                + body
            )
            assert status_of(await read_response(reader)) == 200
    finally:
        writer.close()
    assert [r.method for r in recorder.requests] == ["HEAD", "POST"]
    assert recorder.requests[1].body == body
    assert recorder.requests[1].values("Content-Type") == ["application/json"]


async def test_expect_continue_gets_100_then_the_answer(
    served: FrontSpec, recorder: Recorder
) -> None:
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        async with asyncio.timeout(10):
            writer.write(
                head(
                    "Host: a",
                    "Content-Length: 4",
                    "Expect: 100-continue",
                    request_line="PUT /x HTTP/1.1",
                )
            )
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"data")
            assert status_of(await read_response(reader)) == 200
    finally:
        writer.close()
    assert recorder.requests[0].body == b"data"


async def test_slow_head_gets_408(
    engine: BuiltinFront, recorder: Recorder, short_tmp: Path
) -> None:
    spec = make_spec(recorder.path, short_tmp, timeouts=Timeouts(http_request=0.5))
    await engine.add(spec)
    started = time.monotonic()
    response = await exchange(HOST, spec.port, b"GET / HTTP/1.1\r\nHost: a\r\n", timeout=10)
    assert status_of(response) == 408
    assert 0.4 < time.monotonic() - started < 5
    assert recorder.requests == []


async def test_slow_body_gets_408(
    engine: BuiltinFront, recorder: Recorder, short_tmp: Path
) -> None:
    spec = make_spec(recorder.path, short_tmp, timeouts=Timeouts(client=0.5))
    await engine.add(spec)
    started = time.monotonic()
    raw = head("Host: a", "Content-Length: 10", request_line="POST / HTTP/1.1") + b"abc"
    response = await exchange(HOST, spec.port, raw, timeout=10)
    assert status_of(response) == 408
    assert 0.4 < time.monotonic() - started < 5
    assert recorder.requests == []


async def test_idle_keep_alive_is_closed(
    engine: BuiltinFront, recorder: Recorder, short_tmp: Path
) -> None:
    spec = make_spec(recorder.path, short_tmp, timeouts=Timeouts(http_keep_alive=0.5))
    await engine.add(spec)
    reader, writer = await asyncio.open_connection(HOST, spec.port)
    try:
        async with asyncio.timeout(10):
            writer.write(head("Host: a"))
            assert status_of(await read_response(reader)) == 200
            assert await reader.read(-1) == b""
    finally:
        writer.close()


async def test_per_source_connection_cap(recorder: Recorder, short_tmp: Path) -> None:
    engine = BuiltinFront(EngineOptions(max_conn_per_source=3))
    try:
        spec = make_spec(recorder.path, short_tmp)
        await engine.add(spec)
        held = [await asyncio.open_connection(HOST, spec.port) for _ in range(3)]
        await asyncio.sleep(0.1)
        response = await exchange(HOST, spec.port, head("Host: a"))
        assert status_of(response) == 429
        held[0][1].close()
        await held[0][1].wait_closed()
        await asyncio.sleep(0.2)
        response = await exchange(HOST, spec.port, head("Host: a", "Connection: close"))
        assert status_of(response) == 200
        assert engine.stats(spec.name).rejected_connections == 1
        for _, writer in held[1:]:
            writer.close()
    finally:
        await engine.close()


async def test_rate_limit_answers_429(recorder: Recorder, short_tmp: Path) -> None:
    limits = RateLimitConfig(
        rate_limit_enabled=True,
        base_query_rate_limit=3,
        base_window_duration=60,
        burst_query_rate_limit=3,
        burst_window_duration=60,
    )
    engine = BuiltinFront(EngineOptions(rate_limit=limits))
    try:
        spec = make_spec(recorder.path, short_tmp)
        await engine.add(spec)
        statuses = [
            status_of(await exchange(HOST, spec.port, head("Host: a", "Connection: close")))
            for _ in range(5)
        ]
        assert statuses == [200, 200, 200, 429, 429]
        assert len(recorder.requests) == 3
    finally:
        await engine.close()


async def test_counters_and_access_log(
    served: FrontSpec, engine: BuiltinFront, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="metaproxy.access")
    await exchange(
        HOST, served.port, head("Host: a", "Connection: close", request_line="GET /x?y=1 HTTP/1.1")
    )
    await exchange(HOST, served.port, head("Host: a", request_line="TRACE / HTTP/1.1"))
    stats = engine.stats(served.name)
    assert stats.requests == 2
    assert stats.statuses == {200: 1, 405: 1}
    assert stats.refused == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "metaproxy.access"]
    assert any(
        "network=net-1 client=127.0.0.1 method=GET path=/x?y=1 status=200" in line for line in lines
    ), lines
    assert any("method=TRACE path=/ status=405" in line for line in lines), lines


async def test_token_never_reaches_the_access_log(
    served: FrontSpec, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    raw = head("Host: a", "X-aws-ec2-metadata-token: s3cr3t-t0ken", "Connection: close")
    assert status_of(await exchange(HOST, served.port, raw)) == 200
    assert "s3cr3t-t0ken" not in caplog.text


# -- the agent misbehaving ------------------------------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_agent(path: Path, handler: Handler) -> AsyncIterator[None]:
    """A misbehaving agent; every connection and handler is finished on exit."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(run, path=str(path))
    try:
        yield
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await asyncio.sleep(30)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(5)


async def _early_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    await writer.drain()
    writer.close()


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nall of it"
    )
    await writer.drain()
    writer.close()


async def _chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            await _read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nchun\r\n3\r\nked\r\n0\r\n\r\n"
        )
        await writer.drain()


@pytest.mark.parametrize(
    ("handler", "status", "body"),
    [
        pytest.param(_silent, 504, None, id="slow-504"),
        pytest.param(_garbage, 502, None, id="garbage-502"),
        pytest.param(_early_close, 502, None, id="early-close-502"),
        pytest.param(_close_at_once, 502, None, id="closed-without-answer-502"),
        pytest.param(_close_delimited, 200, b"all of it", id="close-delimited-200"),
        pytest.param(_chunked, 200, b"chunked", id="chunked-200"),
    ],
)
async def test_agent_failures_map_to_statuses(
    engine: BuiltinFront, short_tmp: Path, handler: Handler, status: int, body: bytes | None
) -> None:
    path = short_tmp / "agent.sock"
    async with fake_agent(path, handler):
        spec = make_spec(path, short_tmp, timeouts=Timeouts(server=1.0))
        await engine.add(spec)
        started = time.monotonic()
        response = await exchange(HOST, spec.port, head("Host: a", "Connection: close"))
        assert status_of(response) == status
        if body is not None:
            assert body_of(response) == body
        assert time.monotonic() - started < 5
        if status >= 500:
            assert engine.stats(spec.name).errors == 1
            assert engine.stats(spec.name).last_error


async def test_abandoned_request_closes_its_agent_connection(
    engine: BuiltinFront, short_tmp: Path
) -> None:
    """A client that drops mid-request (a reset: a half-close still gets its answer) must not
    leave an agent connection busy behind it."""
    path = short_tmp / "agent.sock"
    asked = asyncio.Event()
    dropped = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        asked.set()
        if await reader.read(-1) == b"":
            dropped.set()

    async with fake_agent(path, hold):
        spec = make_spec(path, short_tmp)
        await engine.add(spec)
        _, writer = await asyncio.open_connection(HOST, spec.port)
        writer.write(head("Host: a"))
        async with asyncio.timeout(5):
            await asked.wait()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            await dropped.wait()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra", id="whole"),
        pytest.param(b"HTTP/1.1 2", id="partial"),
    ],
)
async def test_a_second_answer_never_reaches_the_next_request(
    engine: BuiltinFront, short_tmp: Path, extra: bytes
) -> None:
    """Bytes after the answer, in the same read, make that agent connection unusable: the
    next request (maybe another instance's) goes on a fresh one."""
    path = short_tmp / "agent.sock"
    connections = 0

    async def answer_twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + extra)
            await writer.drain()

    async with fake_agent(path, answer_twice):
        spec = make_spec(path, short_tmp)
        await engine.add(spec)
        reader, writer = await asyncio.open_connection(HOST, spec.port)
        try:
            async with asyncio.timeout(10):
                for _ in range(3):
                    writer.write(head("Host: a"))
                    response = await read_response(reader)
                    assert (status_of(response), body_of(response)) == (200, b"first")
        finally:
            writer.close()
    assert connections == 3


async def test_agent_missing_is_503_at_once_then_recovers(
    engine: BuiltinFront, short_tmp: Path
) -> None:
    path = short_tmp / "agent.sock"
    spec = make_spec(path, short_tmp)
    await engine.add(spec)
    started = time.monotonic()
    response = await exchange(HOST, spec.port, head("Host: a", "Connection: close"))
    assert status_of(response) == 503
    assert time.monotonic() - started < 1.0
    with Recorder(path) as recorder:
        response = await exchange(HOST, spec.port, head("Host: a", "Connection: close"))
        assert status_of(response) == 200
        assert len(recorder.requests) == 1
    assert engine.stats(spec.name).statuses == {503: 1, 200: 1}


async def test_pooled_connection_closed_by_agent_is_retried(
    engine: BuiltinFront, recorder: Recorder, short_tmp: Path
) -> None:
    """The agent may close an idle pooled connection; the next request must not see a 502."""
    path = short_tmp / "flaky.sock"
    count = 0

    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        await _read_request(reader)
        count += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()

    async with fake_agent(path, once_then_close):
        spec = make_spec(path, short_tmp)
        await engine.add(spec)
        for _ in range(3):
            response = await exchange(HOST, spec.port, head("Host: a", "Connection: close"))
            assert status_of(response) == 200
            await asyncio.sleep(0.3)
        assert count == 3


async def test_remove_stops_one_front_only(
    engine: BuiltinFront, recorder: Recorder, short_tmp: Path
) -> None:
    first = make_spec(recorder.path, short_tmp)
    second = make_spec(recorder.path, short_tmp, identity=Identity("router", "r-1"))
    await engine.add(first)
    await engine.add(second)
    await engine.remove(first.name)
    with pytest.raises(OSError):
        await exchange(HOST, first.port, head("Host: a"))
    response = await exchange(HOST, second.port, head("Host: a", "Connection: close"))
    assert status_of(response) == 200
    assert recorder.requests[-1].values("X-Neutron-Router-ID") == ["r-1"]
    assert recorder.requests[-1].values("X-Neutron-Network-ID") == []
    assert engine.names() == [second.name]


async def test_remove_drains_requests_in_flight(short_tmp: Path) -> None:
    path = short_tmp / "slow.sock"

    async def slow_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_request(reader)
            await asyncio.sleep(0.5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            await writer.drain()

    engine = BuiltinFront(EngineOptions(drain_timeout=5))
    async with fake_agent(path, slow_answer):
        spec = make_spec(path, short_tmp)
        await engine.add(spec)
        idle_reader, idle_writer = await asyncio.open_connection(HOST, spec.port)
        reader, writer = await asyncio.open_connection(HOST, spec.port)
        writer.write(head("Host: a"))
        await asyncio.sleep(0.2)
        removing = asyncio.create_task(engine.remove(spec.name))
        async with asyncio.timeout(10):
            response = await read_response(reader)
            assert status_of(response) == 200
            assert body_of(response) == b"slow"
            assert b"Connection: close\r\n" in response
            assert await reader.read(-1) == b""
            assert await idle_reader.read(-1) == b""  # an idle connection is closed at once
            await removing
        writer.close()
        idle_writer.close()
        await engine.close()


async def test_half_closed_client_gets_its_answers_then_eof(
    served: FrontSpec, recorder: Recorder
) -> None:
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(head("Host: a", request_line="GET /a HTTP/1.1"))
        writer.write(head("Host: a", request_line="GET /b HTTP/1.1"))
        writer.write_eof()
        async with asyncio.timeout(5):
            data = await reader.read(-1)
    finally:
        writer.close()
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert [r.target for r in recorder.requests] == ["/a", "/b"]


async def test_pipelined_flood_resumes_after_the_client_reads(
    served: FrontSpec, recorder: Recorder
) -> None:
    """Hundreds of pipelined requests, read only later: every one is answered, in order."""
    count = 400
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        raw = b"".join(
            head("Host: a", "X-Pad: " + "p" * 2000, request_line=f"GET /{i} HTTP/1.1")
            for i in range(count)
        )
        writer.write(raw)
        await asyncio.sleep(1.0)
        async with asyncio.timeout(60):
            for _ in range(count):
                assert status_of(await read_response(reader)) == 200
    finally:
        writer.close()
    assert [r.target for r in recorder.requests] == [f"/{i}" for i in range(count)]
