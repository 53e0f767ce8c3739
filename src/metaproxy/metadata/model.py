"""The store's records (networks, routers, ports, instances) and their validation, pure.

Every record is built through `*_from_mapping`, whatever the source (a CLI flag set, an import
document, a row read back), so one set of rules decides what the store accepts. A refusal is a
`StoreError` whose `field` names the culprit (`instances[2].uuid`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from metaproxy.errors import StoreError

MAX_USER_DATA = 64 * 1024
MAX_PASSWORD = 1020  # Nova: 4 chunks of 255 bytes in the instance's system metadata
MAX_META_ITEMS = 128
MAX_TEXT = 255

# IDs end up in headers and logs: the same grammar as config.validate_id.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
# RFC 1123 labels: what cloud-init will accept as a hostname.
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


@dataclass(frozen=True, slots=True)
class Subnet:
    cidr: str
    gateway: str | None = None


@dataclass(frozen=True, slots=True)
class Network:
    id: str
    name: str = ""
    project_id: str = ""
    mtu: int | None = None
    subnets: tuple[Subnet, ...] = ()


@dataclass(frozen=True, slots=True)
class Router:
    id: str
    name: str = ""
    project_id: str = ""
    networks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Port:
    id: str
    network_id: str
    mac: str
    instance_id: str
    fixed_ips: tuple[str, ...]
    project_id: str = ""  # "" = the instance's project, filled in by the store


@dataclass(frozen=True, slots=True)
class PublicKey:
    name: str
    data: str


@dataclass(frozen=True, slots=True)
class Instance:
    uuid: str
    project_id: str
    name: str
    hostname: str
    availability_zone: str = "nova"
    launch_index: int = 0
    instance_type: str = "m1.small"
    user_data: bytes | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    public_keys: tuple[PublicKey, ...] = ()
    network_data: Mapping[str, Any] | None = None  # None: generated from the ports
    vendor_data: Mapping[str, Any] = field(default_factory=dict)
    vendor_data2: Mapping[str, Any] = field(default_factory=dict)
    password: str | None = None


@dataclass(frozen=True, slots=True)
class Inventory:
    """A whole store's content, as import and export see it."""

    networks: tuple[Network, ...] = ()
    routers: tuple[Router, ...] = ()
    instances: tuple[Instance, ...] = ()
    ports: tuple[Port, ...] = ()


# -- field checks -----------------------------------------------------------------------------


def _fail(where: str, message: str) -> StoreError:
    return StoreError(f"{where}: {message}", field=where)


def check_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise _fail(where, f"{value!r} is not a valid ID (letters, digits, '.', '_', '-'; ≤ 64)")
    return value


def check_uuid(value: object, where: str) -> str:
    """The canonical lower-case hyphenated form; anything else is refused."""
    try:
        parsed = uuid.UUID(str(value)) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or len(str(value)) not in (32, 36):
        raise _fail(where, f"{value!r} is not a UUID")
    return str(parsed)


def check_mac(value: object, where: str) -> str:
    """Lower-case and colon-separated, as the agent looks it up."""
    text = value.lower() if isinstance(value, str) else ""
    if not _MAC_RE.match(text):
        raise _fail(where, f"{value!r} is not a MAC address (six hex octets)")
    return text.replace("-", ":")


def check_ip(value: object, where: str) -> str:
    """Canonical text form (`ipaddress`), which is what the agent passes to ports_by_ip."""
    try:
        if not isinstance(value, str) or "%" in value:
            raise ValueError
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _fail(where, f"{value!r} is not an IP address") from None


def check_text(value: object, where: str, *, limit: int = MAX_TEXT, empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > limit or (not empty and not value):
        raise _fail(where, f"must be {'a' if empty else 'a non-empty'} string of ≤ {limit} chars")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _fail(where, "must not contain control characters")
    return value


def check_hostname(value: object, where: str) -> str:
    if not isinstance(value, str) or not _HOSTNAME_RE.match(value):
        raise _fail(where, f"{value!r} is not a valid hostname")
    return value


def check_int(value: object, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(where, f"must be an integer in [{low}, {high}]")
    return value


def check_object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _fail(where, "must be a JSON object")
    return dict(value)


def check_user_data(value: bytes, where: str) -> bytes:
    if len(value) > MAX_USER_DATA:
        raise _fail(where, f"is {len(value)} bytes, over the {MAX_USER_DATA}-byte limit")
    return value


def check_password(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value.encode()) > MAX_PASSWORD:
        raise _fail(where, f"must be a string of ≤ {MAX_PASSWORD} bytes")
    return value


def hostname_from_name(name: str) -> str:
    """Nova's sanitize_hostname, roughly: what a display name becomes as a hostname."""
    text = re.sub(r"[ _]", "-", name.lower())
    text = re.sub(r"[^a-z0-9.-]", "", text).strip(".-")[:63].strip(".-")
    return text or "instance"


# -- documents → records ----------------------------------------------------------------------


def _keys(
    doc: object, where: str, allowed: frozenset[str], required: Sequence[str]
) -> dict[str, Any]:
    if not isinstance(doc, Mapping):
        raise _fail(where, "must be a mapping")
    for key in doc:
        if key not in allowed:
            raise _fail(f"{where}.{key}" if where else str(key), "unknown key")
    for key in required:
        if doc.get(key) in (None, ""):
            raise _fail(f"{where}.{key}" if where else key, "is required")
    return dict(doc)


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _fail(where, "must be a list")
    return list(value)


_NETWORK_KEYS = frozenset({"id", "name", "project_id", "mtu", "subnets"})
_SUBNET_KEYS = frozenset({"cidr", "gateway"})


def network_from_mapping(doc: object, where: str = "network") -> Network:
    d = _keys(doc, where, _NETWORK_KEYS, ("id",))
    subnets = []
    for i, item in enumerate(_list(d.get("subnets"), f"{where}.subnets")):
        at = f"{where}.subnets[{i}]"
        s = _keys(item, at, _SUBNET_KEYS, ("cidr",))
        try:
            net = ipaddress.ip_network(str(s["cidr"]), strict=False)
        except ValueError:
            raise _fail(f"{at}.cidr", f"{s['cidr']!r} is not a CIDR") from None
        gateway = s.get("gateway")
        if gateway is not None:
            gateway = check_ip(gateway, f"{at}.gateway")
            if ipaddress.ip_address(gateway) not in net:
                raise _fail(f"{at}.gateway", f"{gateway} is not in {net}")
        subnets.append(Subnet(str(net), gateway))
    mtu = d.get("mtu")
    return Network(
        id=check_id(d["id"], f"{where}.id"),
        name=check_text(d.get("name", ""), f"{where}.name"),
        project_id=check_id(d["project_id"], f"{where}.project_id") if d.get("project_id") else "",
        mtu=None if mtu is None else check_int(mtu, f"{where}.mtu", 68, 65535),
        subnets=tuple(subnets),
    )


_ROUTER_KEYS = frozenset({"id", "name", "project_id", "networks"})


def router_from_mapping(doc: object, where: str = "router") -> Router:
    d = _keys(doc, where, _ROUTER_KEYS, ("id",))
    networks = [
        check_id(n, f"{where}.networks[{i}]")
        for i, n in enumerate(_list(d.get("networks"), f"{where}.networks"))
    ]
    if len(set(networks)) != len(networks):
        raise _fail(f"{where}.networks", "lists a network twice")
    return Router(
        id=check_id(d["id"], f"{where}.id"),
        name=check_text(d.get("name", ""), f"{where}.name"),
        project_id=check_id(d["project_id"], f"{where}.project_id") if d.get("project_id") else "",
        networks=tuple(networks),
    )


_PORT_KEYS = frozenset({"id", "network_id", "mac", "instance_id", "fixed_ips", "project_id"})


def port_from_mapping(doc: object, where: str = "port") -> Port:
    d = _keys(doc, where, _PORT_KEYS, ("id", "network_id", "mac", "instance_id", "fixed_ips"))
    ips = [
        check_ip(ip, f"{where}.fixed_ips[{i}]")
        for i, ip in enumerate(_list(d["fixed_ips"], f"{where}.fixed_ips"))
    ]
    if len(set(ips)) != len(ips):
        raise _fail(f"{where}.fixed_ips", "lists an address twice")
    return Port(
        id=check_id(d["id"], f"{where}.id"),
        network_id=check_id(d["network_id"], f"{where}.network_id"),
        mac=check_mac(d["mac"], f"{where}.mac"),
        instance_id=check_uuid(d["instance_id"], f"{where}.instance_id"),
        fixed_ips=tuple(ips),
        project_id=check_id(d["project_id"], f"{where}.project_id") if d.get("project_id") else "",
    )


_INSTANCE_KEYS = frozenset(
    {
        "uuid",
        "project_id",
        "name",
        "hostname",
        "availability_zone",
        "launch_index",
        "instance_type",
        "user_data",
        "user_data_base64",
        "meta",
        "public_keys",
        "network_data",
        "vendor_data",
        "vendor_data2",
        "password",
    }
)


def _user_data(d: Mapping[str, Any], where: str) -> bytes | None:
    text, encoded = d.get("user_data"), d.get("user_data_base64")
    if text is not None and encoded is not None:
        raise _fail(f"{where}.user_data", "give user_data or user_data_base64, not both")
    if encoded is not None:
        try:
            raw = base64.b64decode(str(encoded), validate=True)
        except (binascii.Error, ValueError):
            raise _fail(f"{where}.user_data_base64", "is not valid base64") from None
        return check_user_data(raw, f"{where}.user_data_base64")
    if text is None:
        return None
    if not isinstance(text, str):
        raise _fail(f"{where}.user_data", "must be a string (or use user_data_base64)")
    return check_user_data(text.encode("utf-8"), f"{where}.user_data")


def _meta(value: object, where: str) -> dict[str, str]:
    items = check_object(value or {}, where)
    if len(items) > MAX_META_ITEMS:
        raise _fail(where, f"has more than {MAX_META_ITEMS} items")
    meta = {}
    for key, item in items.items():
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise _fail(f"{where}.{key}", "must be a string")
        meta[check_text(key, f"{where}.{key}", empty=False)] = check_text(
            str(item), f"{where}.{key}"
        )
    return meta


def _public_keys(value: object, where: str) -> tuple[PublicKey, ...]:
    """A list of {name, data} (order kept: index 0 is EC2's key 0), or a name → key mapping."""
    if isinstance(value, Mapping):
        value = [{"name": k, "data": v} for k, v in value.items()]
    keys: list[PublicKey] = []
    for i, item in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        k = _keys(item, at, frozenset({"name", "data"}), ("name", "data"))
        name = check_text(k["name"], f"{at}.name", empty=False)
        if any(key.name == name for key in keys):
            raise _fail(f"{at}.name", f"key {name!r} is listed twice")
        data = k["data"].strip() if isinstance(k["data"], str) else k["data"]
        keys.append(PublicKey(name, check_text(data, f"{at}.data", limit=16384, empty=False)))
    return tuple(keys)


def instance_from_mapping(doc: object, where: str = "instance") -> Instance:
    d = _keys(doc, where, _INSTANCE_KEYS, ("uuid", "project_id"))
    name = check_text(d.get("name") or d.get("hostname") or "", f"{where}.name")
    hostname = d.get("hostname") or hostname_from_name(name)
    network_data = d.get("network_data")
    password = d.get("password")
    return Instance(
        uuid=check_uuid(d["uuid"], f"{where}.uuid"),
        project_id=check_id(d["project_id"], f"{where}.project_id"),
        name=name,
        hostname=check_hostname(hostname, f"{where}.hostname"),
        availability_zone=check_text(
            d.get("availability_zone", "nova"), f"{where}.availability_zone", empty=False
        ),
        launch_index=check_int(d.get("launch_index", 0), f"{where}.launch_index", 0, 65535),
        instance_type=check_text(
            d.get("instance_type", "m1.small"), f"{where}.instance_type", empty=False
        ),
        user_data=_user_data(d, where),
        meta=_meta(d.get("meta"), f"{where}.meta"),
        public_keys=_public_keys(d.get("public_keys"), f"{where}.public_keys"),
        network_data=None
        if network_data is None
        else check_object(network_data, f"{where}.network_data"),
        vendor_data=check_object(d.get("vendor_data") or {}, f"{where}.vendor_data"),
        vendor_data2=check_object(d.get("vendor_data2") or {}, f"{where}.vendor_data2"),
        password=None if password is None else check_password(password, f"{where}.password"),
    )


_INVENTORY_KEYS = frozenset({"version", "networks", "routers", "instances", "ports"})
INVENTORY_VERSION = 1


def inventory_from_mapping(doc: object) -> Inventory:
    """An import document (already parsed from JSON or YAML) → records, or StoreError."""
    d = _keys(doc, "", _INVENTORY_KEYS, ())
    version = d.get("version", INVENTORY_VERSION)
    if version != INVENTORY_VERSION:
        raise _fail("version", f"{version!r} is not a supported document version (1)")
    return Inventory(
        networks=tuple(
            network_from_mapping(x, f"networks[{i}]")
            for i, x in enumerate(_list(d.get("networks"), "networks"))
        ),
        routers=tuple(
            router_from_mapping(x, f"routers[{i}]")
            for i, x in enumerate(_list(d.get("routers"), "routers"))
        ),
        instances=tuple(
            instance_from_mapping(x, f"instances[{i}]")
            for i, x in enumerate(_list(d.get("instances"), "instances"))
        ),
        ports=tuple(
            port_from_mapping(x, f"ports[{i}]")
            for i, x in enumerate(_list(d.get("ports"), "ports"))
        ),
    )


# -- records → documents ----------------------------------------------------------------------


def network_to_mapping(n: Network) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": n.id, "name": n.name, "project_id": n.project_id}
    if n.mtu is not None:
        doc["mtu"] = n.mtu
    doc["subnets"] = [
        {"cidr": s.cidr, **({"gateway": s.gateway} if s.gateway else {})} for s in n.subnets
    ]
    return doc


def router_to_mapping(r: Router) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "project_id": r.project_id, "networks": list(r.networks)}


def port_to_mapping(p: Port) -> dict[str, Any]:
    return {
        "id": p.id,
        "network_id": p.network_id,
        "mac": p.mac,
        "instance_id": p.instance_id,
        "fixed_ips": list(p.fixed_ips),
        "project_id": p.project_id,
    }


def instance_to_mapping(i: Instance, *, secrets: bool = True) -> dict[str, Any]:
    """The import form of an instance; `secrets=False` leaves the password out."""
    doc: dict[str, Any] = {
        "uuid": i.uuid,
        "project_id": i.project_id,
        "name": i.name,
        "hostname": i.hostname,
        "availability_zone": i.availability_zone,
        "launch_index": i.launch_index,
        "instance_type": i.instance_type,
    }
    if i.user_data is not None:
        try:
            doc["user_data"] = i.user_data.decode("utf-8")
        except UnicodeDecodeError:
            doc["user_data_base64"] = base64.b64encode(i.user_data).decode("ascii")
    doc["meta"] = dict(i.meta)
    doc["public_keys"] = [{"name": k.name, "data": k.data} for k in i.public_keys]
    if i.network_data is not None:
        doc["network_data"] = dict(i.network_data)
    doc["vendor_data"] = dict(i.vendor_data)
    doc["vendor_data2"] = dict(i.vendor_data2)
    if secrets and i.password is not None:
        doc["password"] = i.password
    return doc


def inventory_to_mapping(inv: Inventory) -> dict[str, Any]:
    return {
        "version": INVENTORY_VERSION,
        "networks": [network_to_mapping(n) for n in inv.networks],
        "routers": [router_to_mapping(r) for r in inv.routers],
        "instances": [instance_to_mapping(i) for i in inv.instances],
        "ports": [port_to_mapping(p) for p in inv.ports],
    }
