"""Validation of store records: every refusal names its field, canonical forms come back."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from metaproxy.errors import StoreError
from metaproxy.metadata import model

UUID = "0b5c6ad4-3a7e-4a53-8b8e-6c6b8c3c9d11"


def _instance(**extra: Any) -> dict[str, Any]:
    return {"uuid": UUID, "project_id": "p1", "name": "vm1", **extra}


def _port(**extra: Any) -> dict[str, Any]:
    doc = {"id": "port1", "network_id": "net1", "mac": "fa:16:3e:00:00:01"}
    return {**doc, "instance_id": UUID, "fixed_ips": ["169.254.10.5"], **extra}


@pytest.mark.parametrize(
    ("build", "doc", "field"),
    [
        pytest.param(
            model.instance_from_mapping, _instance(uuid="nope"), "instance.uuid", id="uuid"
        ),
        pytest.param(
            model.instance_from_mapping, _instance(uuid=UUID[:-1]), "instance.uuid", id="short-uuid"
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(project_id=""),
            "instance.project_id",
            id="no-project",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(user_data="x" * (64 * 1024 + 1)),
            "instance.user_data",
            id="user-data-over-64k",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(user_data_base64=base64.b64encode(b"x" * (64 * 1024 + 1)).decode()),
            "instance.user_data_base64",
            id="user-data-b64-over-64k",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(user_data_base64="%%%"),
            "instance.user_data_base64",
            id="user-data-bad-b64",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(usr_data="x"),
            "instance.usr_data",
            id="unknown-key",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(hostname="bad_host!"),
            "instance.hostname",
            id="hostname",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(public_keys=[{"name": "k", "data": "a"}, {"name": "k", "data": "b"}]),
            "instance.public_keys[1].name",
            id="duplicate-key-name",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(meta={"a": {"nested": 1}}),
            "instance.meta.a",
            id="meta-not-string",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(launch_index=-1),
            "instance.launch_index",
            id="launch-index",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(network_data=[1]),
            "instance.network_data",
            id="network-data-not-object",
        ),
        pytest.param(
            model.instance_from_mapping,
            _instance(name="a\nb"),
            "instance.name",
            id="control-char",
        ),
        pytest.param(
            model.port_from_mapping, _port(mac="fa:16:3e:00:00"), "port.mac", id="mac-short"
        ),
        pytest.param(
            model.port_from_mapping, _port(mac="zz:16:3e:00:00:01"), "port.mac", id="mac-hex"
        ),
        pytest.param(
            model.port_from_mapping,
            _port(fixed_ips=["169.254.1.300"]),
            "port.fixed_ips[0]",
            id="ip",
        ),
        pytest.param(
            model.port_from_mapping,
            _port(fixed_ips=["fe80::1%eth0"]),
            "port.fixed_ips[0]",
            id="scope",
        ),
        pytest.param(
            model.port_from_mapping,
            _port(fixed_ips=["169.254.1.1", "169.254.1.1"]),
            "port.fixed_ips",
            id="ip-twice",
        ),
        pytest.param(
            model.port_from_mapping, _port(instance_id="x"), "port.instance_id", id="device"
        ),
        pytest.param(model.port_from_mapping, _port(id="a b"), "port.id", id="port-id"),
        pytest.param(
            model.port_from_mapping, _port(fixed_ips="1.2.3.4"), "port.fixed_ips", id="str"
        ),
        pytest.param(
            model.network_from_mapping,
            {"id": "n1", "subnets": [{"cidr": "x"}]},
            "network.subnets[0].cidr",
            id="cidr",
        ),
        pytest.param(
            model.network_from_mapping,
            {"id": "n1", "subnets": [{"cidr": "169.254.1.0/24", "gateway": "169.254.2.1"}]},
            "network.subnets[0].gateway",
            id="gateway-outside",
        ),
        pytest.param(model.network_from_mapping, {"id": "n1", "mtu": 10}, "network.mtu", id="mtu"),
        pytest.param(model.network_from_mapping, {"id": "n\n1"}, "network.id", id="network-id"),
        pytest.param(
            model.router_from_mapping,
            {"id": "r1", "networks": ["n1", "n1"]},
            "router.networks",
            id="twice",
        ),
        pytest.param(model.inventory_from_mapping, {"instance": []}, "instance", id="top-unknown"),
        pytest.param(model.inventory_from_mapping, {"version": 2}, "version", id="doc-version"),
        pytest.param(
            model.inventory_from_mapping,
            {"ports": [_port(), _port(colour="red")]},
            "ports[1].colour",
            id="nested-unknown",
        ),
    ],
)
def test_refusals_name_the_field(build: Any, doc: dict[str, Any], field: str) -> None:
    with pytest.raises(StoreError) as info:
        build(doc)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_canonical_forms() -> None:
    port = model.port_from_mapping(
        _port(mac="FA-16-3E-AA-BB-CC", fixed_ips=["FE80:0:0::0005", "169.254.10.5"])
    )
    assert port.mac == "fa:16:3e:aa:bb:cc"
    assert port.fixed_ips == ("fe80::5", "169.254.10.5")
    inst = model.instance_from_mapping(
        _instance(uuid=UUID.upper().replace("-", ""), name="My VM_1")
    )
    assert inst.uuid == UUID
    assert inst.hostname == "my-vm-1"


def test_user_data_at_the_limit_is_accepted() -> None:
    inst = model.instance_from_mapping(_instance(user_data="x" * (64 * 1024)))
    assert inst.user_data is not None and len(inst.user_data) == 64 * 1024


def test_public_keys_as_mapping_keep_order() -> None:
    inst = model.instance_from_mapping(_instance(public_keys={"b": "ssh-rsa B", "a": "ssh-rsa A"}))
    assert [k.name for k in inst.public_keys] == ["b", "a"]


def test_inventory_round_trip() -> None:
    doc = {
        "networks": [{"id": "n1", "mtu": 1400, "subnets": [{"cidr": "169.254.10.0/24"}]}],
        "routers": [{"id": "r1", "networks": ["n1"]}],
        "instances": [
            _instance(user_data_base64=base64.b64encode(b"\xff\x00").decode(), password="pw")  # noqa: S106
        ],
        "ports": [_port(network_id="n1", project_id="p1")],
    }
    inv = model.inventory_from_mapping(doc)
    assert model.inventory_from_mapping(model.inventory_to_mapping(inv)) == inv
