"""Port lookup through the PortDirectory seam, and its cache."""

from __future__ import annotations

import pytest

from metaproxy.agent.identity import ClientKey
from metaproxy.agent.lookup import NotFound, PortRegistry, find_port
from metaproxy.metadata.records import PortMatch
from support.agentkit import FakePort, MemoryDirectory

P1 = FakePort("p1", "net-1", "inst-1", "proj-1", "169.254.10.2", "fa:16:3e:00:00:01")
P2 = FakePort("p2", "net-2", "inst-2", "proj-1", "169.254.10.2", "fa:16:3e:00:00:02")
P3 = FakePort("p3", "net-3", "inst-3", "proj-2", "169.254.10.3", "fa:16:3e:00:00:03")


def directory() -> MemoryDirectory:
    return MemoryDirectory(
        ports=[P1, P2, P3],
        routers={"r-one": ["net-1"], "r-two": ["net-1", "net-2"], "r-three": ["net-3"]},
    )


def match(p: FakePort) -> PortMatch:
    return PortMatch(p.port_id, p.network_id, p.instance_id, p.project_id)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param(ClientKey("network", "net-1", "169.254.10.2"), P1, id="network-ip"),
        pytest.param(ClientKey("network", "net-2", "169.254.10.2"), P2, id="same-ip-other-net"),
        pytest.param(ClientKey("router", "r-one", "169.254.10.2"), P1, id="router-ip"),
        pytest.param(ClientKey("router", "r-three", "169.254.10.3"), P3, id="router-other"),
        pytest.param(
            ClientKey("network", "net-1", "fe80::f816:3eff:fe00:1", "fa:16:3e:00:00:01"),
            P1,
            id="network-mac",
        ),
    ],
)
def test_exactly_one_match(key: ClientKey, expected: FakePort) -> None:
    assert find_port(directory(), key) == match(expected)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(ClientKey("network", "net-1", "169.254.10.9"), id="no-port"),
        pytest.param(ClientKey("network", "net-9", "169.254.10.2"), id="no-network"),
        pytest.param(ClientKey("router", "r-two", "169.254.10.2"), id="two-ports-via-router"),
        pytest.param(ClientKey("router", "r-none", "169.254.10.2"), id="unknown-router"),
        pytest.param(ClientKey("network", "net-1", "fe80::1"), id="link-local-no-mac"),
        pytest.param(
            ClientKey("network", "net-1", "fe80::f816:3eff:fe00:9", "fa:16:3e:00:00:09"),
            id="unknown-mac",
        ),
    ],
)
def test_zero_or_several_is_not_found(key: ClientKey) -> None:
    with pytest.raises(NotFound) as info:
        find_port(directory(), key)
    assert info.value.status_hint == 404


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


KEY = ClientKey("network", "net-1", "169.254.10.2")


def test_cache_hit_does_no_store_query_until_ttl() -> None:
    d, clock = directory(), Clock()
    reg = PortRegistry(d, ttl=30, clock=clock)
    assert reg.resolve(KEY) == (match(P1), False)
    assert d.calls == 1
    assert reg.resolve(KEY) == (match(P1), True)
    assert d.calls == 1
    clock.now += 31
    assert reg.resolve(KEY) == (match(P1), False)
    assert d.calls == 2


def test_fresh_skips_and_refreshes_the_cache() -> None:
    d = directory()
    reg = PortRegistry(d, ttl=30, clock=Clock())
    reg.resolve(KEY)
    d.ports[0] = FakePort("p1", "net-1", "inst-new", "proj-1", "169.254.10.2", "x")
    assert reg.resolve(KEY)[0].instance_id == "inst-1"  # cached
    assert reg.resolve(KEY, fresh=True) == (
        PortMatch("p1", "net-1", "inst-new", "proj-1"),
        False,
    )
    assert reg.resolve(KEY) == (PortMatch("p1", "net-1", "inst-new", "proj-1"), True)


def test_not_found_is_not_cached_and_drops_a_stale_entry() -> None:
    d = directory()
    reg = PortRegistry(d, ttl=30, clock=Clock())
    reg.resolve(KEY)
    d.ports.remove(P1)
    with pytest.raises(NotFound):
        reg.resolve(KEY, fresh=True)
    with pytest.raises(NotFound):
        reg.resolve(KEY)
    calls = d.calls
    d.ports.append(P1)
    assert reg.resolve(KEY) == (match(P1), False)
    assert d.calls == calls + 1


def test_zero_ttl_disables_the_cache() -> None:
    d = directory()
    reg = PortRegistry(d, ttl=0)
    reg.resolve(KEY)
    reg.resolve(KEY)
    assert d.calls == 2


def test_cache_is_bounded() -> None:
    d = MemoryDirectory(
        ports=[FakePort(f"p{i}", "n", f"i{i}", "p", f"169.254.1.{i}", "m") for i in range(1, 50)]
    )
    reg = PortRegistry(d, ttl=30, max_entries=8, clock=Clock())
    for i in range(1, 50):
        reg.resolve(ClientKey("network", "n", f"169.254.1.{i}"))
    assert len(reg._cache) <= 8
