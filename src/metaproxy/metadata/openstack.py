"""The OpenStack metadata tree (`/openstack/...`), rendered from an InstanceView (pure)."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from metaproxy.metadata import reply
from metaproxy.metadata.model import Network, Port
from metaproxy.metadata.reply import Reply
from metaproxy.metadata.store import InstanceView

# Nova's list (nova/api/metadata/base.py), oldest first; "latest" follows.
GRIZZLY, HAVANA, LIBERTY = "2013-04-04", "2013-10-17", "2015-10-15"
NEWTON_ONE, NEWTON_TWO = "2016-06-30", "2016-10-06"
VERSIONS: tuple[str, ...] = (
    "2012-08-10",
    GRIZZLY,
    HAVANA,
    LIBERTY,
    NEWTON_ONE,
    NEWTON_TWO,
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
)
LATEST = "latest"
VERSION_LIST = reply.listing([*VERSIONS, LATEST])


def _since(version: str, first: str) -> bool:
    """Is `first`'s feature present in `version`? (ISO dates compare as strings.)"""
    return version == LATEST or version >= first


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(", ", ": "), ensure_ascii=False).encode()


def files(view: InstanceView, version: str) -> list[str]:
    """The version directory's listing, in Nova's order."""
    names = ["meta_data.json"]
    if view.instance.user_data is not None:
        names.append("user_data")
    if _since(version, GRIZZLY):
        names.append("password")
    if _since(version, HAVANA):
        names.append("vendor_data.json")
    if _since(version, LIBERTY):
        names.append("network_data.json")
    if _since(version, NEWTON_TWO):
        names.append("vendor_data2.json")
    return names


SEED_BYTES = 512  # Nova's
SEED_LENGTH = 4 * ((SEED_BYTES + 2) // 3)  # its base64 text
SEED_OPEN = b', "random_seed": "'
SEED_CLOSE = b'"}'
_ENTROPY_BATCH = 64


class _Entropy:
    """Fresh random bytes from os.urandom, read 64 seeds at a time; each is handed out once."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        # A forked child must not hand out the seeds its parent still holds.
        os.register_at_fork(after_in_child=self.forget)

    def forget(self) -> None:
        self._pool, self._at = b"", 0

    def take(self, size: int) -> bytes:
        if self._at + size > len(self._pool):
            self._pool, self._at = os.urandom(size * _ENTROPY_BATCH), 0
        chunk = self._pool[self._at : self._at + size]
        self._at += size
        return chunk


_entropy = _Entropy()


def seed() -> bytes:
    """A new random_seed value (base64 of 512 random bytes): never the same for two answers."""
    return base64.b64encode(_entropy.take(SEED_BYTES))


def seeded(answer: Reply) -> Reply:
    """The cacheable meta_data.json answer with this request's `random_seed` added."""
    body = answer.body[:-1] + SEED_OPEN + seed() + SEED_CLOSE
    return Reply(answer.status, body, answer.content_type, answer.headers)


def meta_data(view: InstanceView, version: str) -> dict[str, Any]:
    """meta_data.json without its random_seed (added per request by `seeded`)."""
    inst = view.instance
    doc: dict[str, Any] = {
        "uuid": inst.uuid,
        "meta": dict(inst.meta),
        "hostname": inst.hostname,
        "name": inst.name,
        "launch_index": inst.launch_index,
        "availability_zone": inst.availability_zone,
    }
    if inst.public_keys:
        doc["public_keys"] = {k.name: k.data for k in inst.public_keys}
        if _since(version, LIBERTY):
            doc["keys"] = [
                {"name": k.name, "type": "ssh", "data": k.data} for k in inst.public_keys
            ]
    if _since(version, LIBERTY):
        doc["project_id"] = inst.project_id
    if _since(version, NEWTON_ONE):
        doc["devices"] = []
    return doc


def _subnet_for(
    network: Network, ip: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str | None] | None:
    address = ipaddress.ip_address(ip)
    for subnet in network.subnets:
        cidr = ipaddress.ip_network(subnet.cidr)
        if address in cidr:
            return cidr, subnet.gateway
    return None


def _network_entry(
    index: int, link: str, port: Port, network: Network, ip: str
) -> dict[str, Any] | None:
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.is_link_local:
        return None  # every IPv6 interface has one already; nothing to configure
    found = _subnet_for(network, ip)
    entry: dict[str, Any] = {"id": f"network{index}", "link": link, "network_id": network.id}
    if found is None:
        entry["type"] = "ipv4_dhcp" if address.version == 4 else "ipv6_dhcp"
        return entry
    cidr, gateway = found
    default = "0.0.0.0" if address.version == 4 else "::"  # noqa: S104
    entry.update(
        type=f"ipv{address.version}",
        ip_address=ip,
        netmask=str(cidr.netmask),
        routes=[{"network": default, "netmask": default, "gateway": gateway}] if gateway else [],
        services=[],
    )
    return entry


def network_data(view: InstanceView) -> dict[str, Any]:
    """The stored network_data.json, or one generated from the instance's ports (Nova's shape)."""
    if view.instance.network_data is not None:
        return dict(view.instance.network_data)
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    for port, network in view.ports:
        link = f"tap{port.id[:11]}"
        links.append(
            {
                "id": link,
                "vif_id": port.id,
                "type": "phy",
                "mtu": network.mtu,
                "ethernet_mac_address": port.mac,
            }
        )
        for ip in port.fixed_ips:
            entry = _network_entry(len(networks), link, port, network, ip)
            if entry is not None:
                networks.append(entry)
    return {"links": links, "networks": networks, "services": []}


def respond(view: InstanceView, parts: Sequence[str], method: str, body: bytes) -> Reply:
    """Answer `/openstack/<parts...>` for an instance already authenticated."""
    if not parts:
        return VERSION_LIST if method == "GET" else reply.not_allowed("GET, HEAD")
    version = parts[0]
    if version != LATEST and version not in VERSIONS:
        return reply.NOT_FOUND
    if len(parts) == 1:
        return (
            reply.listing(files(view, version))
            if method == "GET"
            else reply.not_allowed("GET, HEAD")
        )
    if len(parts) != 2 or parts[1] not in files(view, version):
        return reply.NOT_FOUND
    name = parts[1]
    if name == "password":
        return _password(view, method, body)
    if method != "GET":
        return reply.not_allowed("GET, HEAD")
    inst = view.instance
    if name == "meta_data.json":
        answer = reply.ok(_dumps(meta_data(view, version)), reply.JSON)
        # Nova sends fresh entropy on every request (HAVANA on); cloud-init seeds the guest's RNG.
        return replace(answer, seeded=True) if _since(version, HAVANA) else answer
    if name == "user_data":
        return reply.ok(inst.user_data or b"", reply.BINARY)
    if name == "network_data.json":
        return reply.ok(_dumps(network_data(view)), reply.JSON)
    if name == "vendor_data.json":
        return reply.ok(_dumps(dict(inst.vendor_data)), reply.JSON)
    return reply.ok(_dumps(dict(inst.vendor_data2)), reply.JSON)


# The server stores a POSTed password; this module only decides what the request means.
PASSWORD_STORE = Reply(200)


def _password(view: InstanceView, method: str, body: bytes) -> Reply:
    if method == "GET":
        return reply.ok(view.instance.password or "")
    if method != "POST":
        return reply.not_allowed("GET, HEAD, POST")
    if view.instance.password:
        return reply.error(409)  # Nova: the password is set once, by the guest's first POST
    return PASSWORD_STORE
