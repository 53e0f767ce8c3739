"""The control socket (0600, stale/live handling) and the metrics endpoint over real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from metaproxy.errors import ConfigError, MetaproxyError
from metaproxy.service import control
from metaproxy.service.metrics import Family, Histogram, MetricsServer, render
from metaproxy.service.settings import MetricsEndpoint


async def _status(command: str) -> dict[str, Any]:
    return {"fronts": [{"name": "network-a", "state": "running"}], "command": command}


async def test_control_socket_is_private_and_answers(short_tmp: Path) -> None:
    path = short_tmp / "control.sock"
    server = control.ControlServer(path, _status)
    await server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reply = await asyncio.to_thread(control.request, path, "status")
        assert reply["fronts"][0]["name"] == "network-a"
        with pytest.raises(MetaproxyError, match="unknown command"):
            await asyncio.to_thread(control.request, path, "rm -rf")
        # A second service on the same state path is refused while the first one runs.
        with pytest.raises(ConfigError, match="already running"):
            control.claim_socket_path(path)
    finally:
        await server.close()
    assert not path.exists()


def test_stale_socket_is_replaced_and_non_socket_refused(short_tmp: Path) -> None:
    stale = short_tmp / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()  # bound, never listening: what a crashed service leaves
    control.claim_socket_path(stale)
    assert not stale.exists()
    regular = short_tmp / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        control.claim_socket_path(regular)
    assert regular.exists()


def test_status_when_not_running_is_clear(short_tmp: Path) -> None:
    with pytest.raises(MetaproxyError, match="not running"):
        control.request(short_tmp / "nothing.sock", "status")


def test_render_exposition() -> None:
    requests = Family("metaproxy_requests_total", "Requests", "counter")
    requests.add(3, network="net-a", status="200", engine="builtin")
    requests.add(1, network='we"ird\n', status="404", engine="haproxy")
    latency = Family("metaproxy_upstream_latency_seconds", "Latency", "histogram")
    hist = Histogram(buckets=(0.01, 0.1))
    for value in (0.005, 0.05, 0.5):
        hist.observe(value)
    hist.export(latency, network="net-a")
    assert render([requests, latency]).splitlines() == [
        "# HELP metaproxy_requests_total Requests",
        "# TYPE metaproxy_requests_total counter",
        'metaproxy_requests_total{network="net-a",status="200",engine="builtin"} 3',
        'metaproxy_requests_total{network="we\\"ird\\n",status="404",engine="haproxy"} 1',
        "# HELP metaproxy_upstream_latency_seconds Latency",
        "# TYPE metaproxy_upstream_latency_seconds histogram",
        'metaproxy_upstream_latency_seconds_bucket{network="net-a",le="0.01"} 1',
        'metaproxy_upstream_latency_seconds_bucket{network="net-a",le="0.1"} 2',
        'metaproxy_upstream_latency_seconds_bucket{network="net-a",le="+Inf"} 3',
        'metaproxy_upstream_latency_seconds_sum{network="net-a"} 0.555',
        'metaproxy_upstream_latency_seconds_count{network="net-a"} 3',
    ]


async def _get(
    reader_writer: tuple[asyncio.StreamReader, asyncio.StreamWriter], req: bytes
) -> bytes:
    reader, writer = reader_writer
    writer.write(req)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


def _collect() -> list[Family]:
    fam = Family("metaproxy_fronts", "Fronts", "gauge")
    fam.add(2, state="running")
    return [fam]


async def test_metrics_over_tcp_and_unix(short_tmp: Path) -> None:
    tcp = MetricsServer(MetricsEndpoint(host="127.0.0.1", port=0), _collect)
    unix_path = short_tmp / "metrics.sock"
    unix = MetricsServer(MetricsEndpoint(path=unix_path), _collect)
    await tcp.start()
    await unix.start()
    try:
        assert tcp.port
        async with asyncio.timeout(10):
            ok = await _get(
                await asyncio.open_connection("127.0.0.1", tcp.port),
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            )
            missing = await _get(
                await asyncio.open_connection("127.0.0.1", tcp.port),
                b"GET /other HTTP/1.1\r\n\r\n",
            )
            post = await _get(
                await asyncio.open_connection("127.0.0.1", tcp.port),
                b"POST /metrics HTTP/1.1\r\n\r\n",
            )
            via_unix = await _get(
                await asyncio.open_unix_connection(str(unix_path)),
                b"GET /metrics HTTP/1.1\r\n\r\n",
            )
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"text/plain; version=0.0.4" in ok
        assert ok.endswith(b'metaproxy_fronts{state="running"} 2\n')
        assert missing.startswith(b"HTTP/1.1 404")
        assert post.startswith(b"HTTP/1.1 405")
        assert via_unix.startswith(b"HTTP/1.1 200 OK")
        assert stat.S_IMODE(os.stat(unix_path).st_mode) == 0o600
    finally:
        await tcp.close()
        await unix.close()
    assert not unix_path.exists()


async def test_metrics_address_in_use_is_a_config_error() -> None:
    first = MetricsServer(MetricsEndpoint(host="127.0.0.1", port=0), _collect)
    await first.start()
    try:
        second = MetricsServer(MetricsEndpoint(host="127.0.0.1", port=first.port), _collect)
        with pytest.raises(ConfigError, match=r"service\.metrics: cannot listen on 127\.0\.0\.1:"):
            await second.start()
    finally:
        await first.close()
