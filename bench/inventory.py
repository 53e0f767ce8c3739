"""The store's content for the full-path and boot-storm scenarios: one network, N instances."""

from __future__ import annotations

import uuid
from typing import Any

NETWORK_ID = "bench-net-0001"
PROJECT_ID = "bench-project"
SSH_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJlbmNoYmVuY2hiZW5jaGJlbmNoYmVuY2hiZW5jaGJl bench@mp"
)
USER_DATA = "#cloud-config\nhostname: bench\npackages: []\n"


def storm_sources(count: int) -> list[str]:
    """`count` distinct loopback source addresses, 127.1.0.1 upwards (all local on lo)."""
    return [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(count)]


def document(addresses: list[str]) -> dict[str, Any]:
    """An import document: one instance with one port per address, on NETWORK_ID."""
    instances, ports = [], []
    for i, address in enumerate(addresses):
        instance = str(uuid.UUID(int=0xB3C0_0000_0000_4000_8000_0000_0000_0000 + i))
        instances.append(
            {
                "uuid": instance,
                "project_id": PROJECT_ID,
                "name": f"bench-{i}",
                "hostname": f"bench-{i}",
                "availability_zone": "nova",
                "launch_index": 0,
                "user_data": USER_DATA,
                "meta": {"role": "bench"},
                "public_keys": [{"name": "bench", "data": SSH_KEY}],
            }
        )
        ports.append(
            {
                "id": f"bench-port-{i}",
                "network_id": NETWORK_ID,
                "mac": f"fa:16:3e:{i >> 16 & 0xFF:02x}:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}",
                "instance_id": instance,
                "fixed_ips": [address],
                "project_id": PROJECT_ID,
            }
        )
    return {
        "version": 1,
        "networks": [
            {
                "id": NETWORK_ID,
                "name": "bench",
                "project_id": PROJECT_ID,
                "subnets": [{"cidr": "127.0.0.0/8"}],
            }
        ],
        "instances": instances,
        "ports": ports,
    }
