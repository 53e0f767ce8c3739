"""The builtin engine inside real network namespaces: many networks in one process, IPv6
link-local, and a slow-header flood that must not starve anyone else."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from metaproxy.config import FrontSpec, Identity
from metaproxy.errors import ConfigError, NamespaceError
from metaproxy.front.builtin import BuiltinFront, EngineOptions
from support import netns
from support.netns import METADATA_IP, Pair, in_ns, ip
from support.recorder import Recorder

pytestmark = [pytest.mark.netns, netns.requires_netns]

NETWORKS = 50
URL = f"http://{METADATA_IP}/latest/meta-data/instance-id"


@pytest.fixture
def echo(short_tmp: Path) -> Iterator[Recorder]:
    """A backend answering with the identity header it received."""
    with Recorder(short_tmp / "agent.sock", echo="X-Neutron-Network-ID") as rec:
        yield rec


@pytest.fixture
async def engine() -> AsyncIterator[BuiltinFront]:
    front = BuiltinFront(EngineOptions(max_conn_per_source=512))
    try:
        yield front
    finally:
        await front.close()


def spec_for(pair: Pair, network_id: str, socket: Path, **extra: object) -> FrontSpec:
    values: dict[str, object] = {
        "identity": Identity("network", network_id),
        "upstream_socket": socket,
        "bind_address": METADATA_IP,
        "port": 80,
        "state_path": socket.parent,
        "netns": pair.net_ns,
    }
    values.update(extra)
    return FrontSpec(**values)  # type: ignore[arg-type]


def curl(pair: Pair, url: str = URL, *extra: str) -> tuple[int, str, float]:
    """(status, body, seconds curl spent on the exchange) from the instance side."""
    result = in_ns(
        pair.inst_ns,
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code} %{time_total}",
        *extra,
        url,
        timeout=20,
    )
    body, _, tail = result.stdout.rpartition("\n")
    code, _, seconds = tail.partition(" ")
    return int(code or 0), body.strip(), float(seconds or 0)


@pytest.mark.slow
async def test_fifty_networks_in_one_process(engine: BuiltinFront, echo: Recorder) -> None:
    pairs = await asyncio.to_thread(netns.create_pairs, NETWORKS)
    try:
        started = time.monotonic()
        for i, pair in enumerate(pairs):
            await engine.add(spec_for(pair, f"net-{i:03d}", echo.path))
        added = time.monotonic() - started
        results = await asyncio.gather(*(asyncio.to_thread(curl, pair) for pair in pairs))
        for i, (status, body, _) in enumerate(results):
            assert (status, body) == (200, f"net-{i:03d}"), i
        assert {tuple(r.values("X-Forwarded-For")) for r in echo.requests} == {("169.254.10.2",)}

        await engine.remove("network-net-000")
        gone, _, _ = await asyncio.to_thread(curl, pairs[0])
        assert gone == 0  # nothing listens there any more: connection refused
        rest = await asyncio.gather(*(asyncio.to_thread(curl, pair) for pair in pairs[1:]))
        assert [r[:2] for r in rest] == [(200, f"net-{i:03d}") for i in range(1, NETWORKS)]
        assert engine.stats("network-net-001").requests == 2
        print(f"\n{NETWORKS} fronts added in {added:.2f}s", file=sys.stderr)
    finally:
        await engine.close()
        await asyncio.to_thread(netns.delete_pairs, pairs)
    leftover = ip("netns", "list").stdout
    assert not any(p.net_ns in leftover or p.inst_ns in leftover for p in pairs)


async def test_missing_namespace_fails_that_network_only(
    engine: BuiltinFront, echo: Recorder, ns_pair: Pair
) -> None:
    await engine.add(spec_for(ns_pair, "net-ok", echo.path))
    with pytest.raises(NamespaceError, match="does not exist"):
        await engine.add(
            spec_for(ns_pair, "net-gone", echo.path, netns="mp-missing-" + netns.suffix())
        )
    with pytest.raises(ConfigError, match=r"cannot listen on 169\.254\.1\.1:80"):
        await engine.add(spec_for(ns_pair, "net-noaddr", echo.path, bind_address="169.254.1.1"))
    status, body, _ = await asyncio.to_thread(curl, ns_pair)
    assert (status, body) == (200, "net-ok")
    assert engine.names() == ["network-net-ok"]


async def test_ipv6_link_local_on_an_interface(
    engine: BuiltinFront, echo: Recorder, ns_pair: Pair
) -> None:
    ip("-n", ns_pair.net_ns, "addr", "add", "fe80::a9fe:a9fe/64", "dev", ns_pair.net_if, "nodad")
    ip("-n", ns_pair.inst_ns, "addr", "add", "fe80::2/64", "dev", ns_pair.inst_if, "nodad")
    spec = spec_for(
        ns_pair, "net-v6", echo.path, bind_address="fe80::a9fe:a9fe", interface=ns_pair.net_if
    )
    await engine.add(spec)
    url = f"http://[fe80::a9fe:a9fe%{ns_pair.inst_if}]/latest/meta-data/"
    status, body, _ = await asyncio.to_thread(curl, ns_pair, url, "-g")
    assert (status, body) == (200, "net-v6")
    assert echo.requests[-1].values("X-Forwarded-For") == ["fe80::2"]


SLOW_CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    held = []
    for _ in range(int(sys.argv[2])):
        s = socket.create_connection((sys.argv[1], 80), timeout=5)
        s.sendall(b"GET /latest/meta-data/ HTTP/1.1\\r\\nHost: a\\r\\nX-Slow: ")
        held.append(s)
    print("ready", len(held), flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.slow
async def test_slow_header_flood_does_not_starve_others(
    engine: BuiltinFront, echo: Recorder
) -> None:
    pairs = await asyncio.to_thread(netns.create_pairs, 2)
    flood: subprocess.Popen[str] | None = None
    try:
        for i, pair in enumerate(pairs):
            await engine.add(spec_for(pair, f"net-{i}", echo.path))
        # 200 connections into network 0's front from its own namespace, each stuck mid-head.
        flood = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                pairs[0].net_ns,
                sys.executable,
                "-c",
                SLOW_CLIENT,
                METADATA_IP,
                "200",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert flood.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(flood.stdout.readline), 60)
        assert line.strip() == "ready 200"
        await asyncio.sleep(0.2)
        assert engine.stats("network-net-0").connections >= 200
        for pair, network in ((pairs[0], "net-0"), (pairs[1], "net-1")):
            status, body, seconds = await asyncio.to_thread(curl, pair)
            assert (status, body) == (200, network)
            assert seconds < 1.0, seconds
    finally:
        if flood is not None:
            flood.kill()
            flood.communicate(timeout=10)
        await engine.close()
        await asyncio.to_thread(netns.delete_pairs, pairs)
