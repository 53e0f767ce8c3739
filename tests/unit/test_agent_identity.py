"""The identity headers a front sends, and the client addresses they carry."""

from __future__ import annotations

import ipaddress

import pytest

from metaproxy.agent.identity import ClientKey, client_address, client_key, eui64_mac
from metaproxy.errors import ClientProtocolError


def headers(*pairs: tuple[str, str]) -> object:
    def getall(name: str) -> list[str]:
        return [v for k, v in pairs if k.lower() == name.lower()]

    return getall


NET = ("X-Neutron-Network-ID", "net-1")
RTR = ("X-Neutron-Router-ID", "rtr-1")
XFF = ("X-Forwarded-For", "169.254.10.2")


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        pytest.param((NET, XFF), ClientKey("network", "net-1", "169.254.10.2"), id="network"),
        pytest.param((RTR, XFF), ClientKey("router", "rtr-1", "169.254.10.2"), id="router"),
        pytest.param(
            (NET, ("X-Forwarded-For", " 169.254.10.2 ")),
            ClientKey("network", "net-1", "169.254.10.2"),
            id="whitespace",
        ),
    ],
)
def test_valid(pairs: tuple[tuple[str, str], ...], expected: ClientKey) -> None:
    assert client_key(headers(*pairs)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param((NET, NET, XFF), id="network-twice"),
        pytest.param((NET, RTR, XFF), id="network-and-router"),
        pytest.param((RTR, RTR, XFF), id="router-twice"),
        pytest.param((XFF,), id="neither"),
        pytest.param((NET,), id="no-forwarded-for"),
        pytest.param((NET, XFF, XFF), id="forwarded-for-twice"),
        pytest.param((NET, ("X-Forwarded-For", "169.254.10.2, 169.254.1.1")), id="comma"),
        pytest.param((NET, ("X-Forwarded-For", "")), id="empty"),
        pytest.param((NET, ("X-Forwarded-For", "169.254.010.002")), id="leading-zeros"),
        pytest.param((NET, ("X-Forwarded-For", "1.2.3.4.5")), id="garbage"),
        pytest.param((NET, ("X-Forwarded-For", "169.254.10.2/32")), id="cidr"),
        pytest.param((("X-Neutron-Network-ID", "../etc"), XFF), id="bad-id"),
        pytest.param((("X-Neutron-Network-ID", ""), XFF), id="empty-id"),
    ],
)
def test_invalid_is_400(pairs: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(ClientProtocolError) as info:
        client_key(headers(*pairs))  # type: ignore[arg-type]
    assert info.value.status_hint == 400


@pytest.mark.parametrize(
    ("text", "ip", "mac"),
    [
        pytest.param("169.254.10.2", "169.254.10.2", None, id="ipv4"),
        pytest.param("::ffff:169.254.10.2", "169.254.10.2", None, id="ipv4-mapped"),
        pytest.param("2001:db8::5", "2001:db8::5", None, id="ipv6-global"),
        pytest.param(
            "fe80::f816:3eff:fe12:3456", "fe80::f816:3eff:fe12:3456", "fa:16:3e:12:34:56", id="ll"
        ),
        pytest.param(
            "fe80::f816:3eff:fe12:3456%eth0",
            "fe80::f816:3eff:fe12:3456",
            "fa:16:3e:12:34:56",
            id="ll-scoped",
        ),
        pytest.param("fe80::1", "fe80::1", None, id="ll-not-eui64"),
    ],
)
def test_client_address(text: str, ip: str, mac: str | None) -> None:
    assert client_address(text) == (ip, mac)


def test_eui64_flips_the_universal_local_bit() -> None:
    assert eui64_mac(ipaddress.IPv6Address("fe80::200:5eff:fe00:5301")) == "00:00:5e:00:53:01"
