"""A small, complete inventory and signed-header helpers for metadata server tests."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from metaproxy.config import Secret
from metaproxy.metadata import model
from metaproxy.metadata.store import SqliteStore
from metaproxy.security.signing import sign_instance_id

SECRET = Secret("test-shared-secret")
VM1 = "6f1c2c8e-5a3b-4e0f-9d7a-1b2c3d4e5f60"  # full instance: keys, user data, meta
VM2 = "0a0b0c0d-1111-4222-8333-444455556666"  # bare instance of another project
PROJECT1, PROJECT2 = "proj-one", "proj-two"
USER_DATA = b"#cloud-config\nhostname: from-user-data\nruncmd:\n  - [echo, hello]\n"
KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyOneKeyOneKeyOneKeyOneKeyOneKeyOne01 one@test"
KEY2 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQKeyTwo two@test"

INVENTORY: dict[str, Any] = {
    "networks": [
        {
            "id": "net-a",
            "mtu": 1450,
            "subnets": [{"cidr": "169.254.20.0/24", "gateway": "169.254.20.1"}],
        },
        {"id": "net-b"},
    ],
    "routers": [{"id": "router-1", "networks": ["net-a", "net-b"]}],
    "instances": [
        {
            "uuid": VM1,
            "project_id": PROJECT1,
            "name": "web-1",
            "hostname": "web-1",
            "availability_zone": "zone-1a",
            "launch_index": 2,
            "instance_type": "m1.tiny",
            "user_data_base64": base64.b64encode(USER_DATA).decode(),
            "meta": {"role": "web", "dsmode": "net"},
            "public_keys": [{"name": "first", "data": KEY1}, {"name": "second", "data": KEY2}],
            "vendor_data": {"cloud-init": "#cloud-config\n{}"},
            "vendor_data2": {"static": {"hello": "world"}},
        },
        {"uuid": VM2, "project_id": PROJECT2, "name": "bare"},
    ],
    "ports": [
        {
            "id": "port-1",
            "network_id": "net-a",
            "mac": "fa:16:3e:11:22:33",
            "instance_id": VM1,
            "fixed_ips": ["169.254.20.10", "fe80::f816:3eff:fe11:2233"],
        },
        {
            "id": "port-2",
            "network_id": "net-b",
            "mac": "fa:16:3e:44:55:66",
            "instance_id": VM2,
            "fixed_ips": ["169.254.30.10"],
        },
    ],
}


def make_store(path: Path) -> SqliteStore:
    store = SqliteStore(path)
    store.import_inventory(model.inventory_from_mapping(INVENTORY))
    return store


def identity(instance: str = VM1, project: str = PROJECT1) -> list[tuple[bytes, bytes]]:
    """The three headers the agent adds, correctly signed."""
    return [
        (b"X-Instance-ID", instance.encode()),
        (b"X-Tenant-ID", project.encode()),
        (b"X-Instance-ID-Signature", sign_instance_id(SECRET, instance).encode()),
        (b"X-Forwarded-For", b"169.254.20.10"),
    ]
