"""Who is asking: the identity headers a front sends, checked strictly (pure, no I/O)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from metaproxy.config import IdentityKind, validate_id
from metaproxy.errors import ClientProtocolError, ConfigError

NETWORK_HEADER = "X-Neutron-Network-ID"
ROUTER_HEADER = "X-Neutron-Router-ID"
FORWARDED_FOR = "X-Forwarded-For"

GetAll = Callable[[str], list[str]]


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A request's claimed origin: a network or router, and the client's address (and MAC)."""

    kind: IdentityKind
    id: str
    ip: str
    mac: str | None = None


def client_key(getall: GetAll) -> ClientKey:
    """Parse the identity headers (`getall(name)` returns every value, any case).

    Exactly one of X-Neutron-Network-ID / X-Neutron-Router-ID, exactly one X-Forwarded-For with
    one address; anything else is a ClientProtocolError(400). A front never sends more, so more
    means a front bug or a spoofing attempt — never a guess at which value to believe.
    """
    networks, routers = getall(NETWORK_HEADER), getall(ROUTER_HEADER)
    if len(networks) + len(routers) != 1:
        raise ClientProtocolError(
            f"expected exactly one {NETWORK_HEADER} or {ROUTER_HEADER}, "
            f"got {len(networks)} and {len(routers)}"
        )
    kind: IdentityKind = "network" if networks else "router"
    raw_id = (networks or routers)[0].strip()
    try:
        ident = validate_id(raw_id, key=f"{kind}_id")
    except ConfigError:
        raise ClientProtocolError(f"malformed {kind} ID {raw_id[:80]!r}") from None
    forwarded = getall(FORWARDED_FOR)
    if len(forwarded) != 1:
        raise ClientProtocolError(f"expected exactly one {FORWARDED_FOR}, got {len(forwarded)}")
    ip, mac = client_address(forwarded[0])
    return ClientKey(kind, ident, ip, mac)


def client_address(text: str) -> tuple[str, str | None]:
    """One address → (canonical IP, MAC for an IPv6 link-local EUI-64 address, else None)."""
    value = text.strip()
    if not value or "," in value or len(value) > 64:
        raise ClientProtocolError(f"{FORWARDED_FOR} must hold exactly one address")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ClientProtocolError(f"{FORWARDED_FOR}: {value!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address):
        # haproxy listening on v4 and v6 reports IPv4 clients as ::ffff:a.b.c.d.
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped), None
        bare = ipaddress.IPv6Address(address.packed)  # drops a %scope
        if bare.is_link_local:
            # A link-local address is not a port's fixed IP: the MAC in its interface ID is
            # all that identifies the client (SLAAC EUI-64, RFC 4291 appendix A).
            return str(bare), eui64_mac(bare)
        return str(bare), None
    return str(address), None


def eui64_mac(address: ipaddress.IPv6Address) -> str | None:
    """The MAC an EUI-64 interface ID encodes (ff:fe in the middle, U/L bit flipped), or None."""
    iid = address.packed[8:]
    if iid[3:5] != b"\xff\xfe":
        return None  # a privacy or manually set interface ID: no MAC to read
    mac = bytes([iid[0] ^ 0x02, iid[1], iid[2], iid[5], iid[6], iid[7]])
    return ":".join(f"{b:02x}" for b in mac)
