"""The EC2-compatible tree (`/<version>/meta-data/...`, user-data, dynamic/), pure.

Listing rules, as Nova and AWS print them: one name per line, directories end with `/`, and
`public-keys/` lists `0=name` (the client then reads `public-keys/0/openssh-key`). A trailing
slash on a request is optional for both files and directories (`ec2-metadata` asks for
`/latest/user-data/`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from metaproxy.metadata import reply
from metaproxy.metadata.reply import Reply
from metaproxy.metadata.store import InstanceView

# Nova's EC2 versions (nova/api/metadata/base.py); cloud-init probes newer ones, gets 404 and
# falls back to 2009-04-04.
VERSIONS: tuple[str, ...] = (
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
)
LATEST = "latest"
VERSION_LIST = reply.listing([*VERSIONS, LATEST])

Tree = dict[str, Any]  # a directory: name → Tree, or str/bytes for a file


def _first_ipv4(view: InstanceView) -> str | None:
    for port, _ in view.ports:
        for ip in port.fixed_ips:
            # Fixed IPs are stored in canonical text form: only IPv6 has a colon.
            if ":" not in ip:
                return ip
    return None


def meta_data(view: InstanceView) -> Tree:
    inst = view.instance
    tree: Tree = {
        "ami-launch-index": str(inst.launch_index),
        "hostname": inst.hostname,
        "instance-id": inst.uuid,
        "instance-type": inst.instance_type,
        "local-hostname": inst.hostname,
        "placement": {"availability-zone": inst.availability_zone},
    }
    ipv4 = _first_ipv4(view)
    if ipv4 is not None:
        tree["local-ipv4"] = ipv4
    if view.ports:
        tree["mac"] = view.ports[0][0].mac
    if inst.public_keys:
        tree["public-keys"] = {
            str(i): {"openssh-key": key.data} for i, key in enumerate(inst.public_keys)
        }
    return tree


def region(zone: str) -> str:
    """botocore's rule: the region is the zone minus its letter (us-east-1a → us-east-1)."""
    return zone[:-1] if re.fullmatch(r".*\d[a-z]", zone) else zone


def identity_document(view: InstanceView) -> dict[str, Any]:
    inst = view.instance
    return {
        "accountId": inst.project_id,
        "architecture": "x86_64",
        "availabilityZone": inst.availability_zone,
        "imageId": None,
        "instanceId": inst.uuid,
        "instanceType": inst.instance_type,
        "privateIp": _first_ipv4(view),
        "region": region(inst.availability_zone),
        "version": "2017-09-30",
    }


def version_tree(view: InstanceView) -> Tree:
    tree: Tree = {
        "meta-data": meta_data(view),
        "dynamic": {
            "instance-identity": {
                "document": json.dumps(identity_document(view), indent=2).encode()
            }
        },
    }
    if view.instance.user_data is not None:
        tree["user-data"] = view.instance.user_data
    return tree


def _list(node: Tree, parts: Sequence[str], view: InstanceView) -> Reply:
    if parts and parts[-1] == "public-keys" and len(parts) == 2:
        return reply.listing(f"{i}={k.name}" for i, k in enumerate(view.instance.public_keys))
    return reply.listing(
        f"{name}/" if isinstance(child, dict) else name for name, child in sorted(node.items())
    )


def respond(view: InstanceView, parts: Sequence[str], tree: Tree | None = None) -> Reply:
    """Answer GET `/<version>/<parts...>` for an instance already authenticated.

    `tree`: version_tree(view), when the caller keeps it (it is the same for every path).
    """
    version = parts[0]
    if version != LATEST and version not in VERSIONS:
        return reply.NOT_FOUND
    node: Tree | str | bytes = version_tree(view) if tree is None else tree
    for name in parts[1:]:
        if not isinstance(node, dict) or name not in node:
            return reply.NOT_FOUND
        node = node[name]
    if isinstance(node, dict):
        return _list(node, parts[1:], view)
    if parts[1] == "user-data":
        return reply.ok(node, reply.BINARY)
    if parts[1] == "dynamic":
        return reply.ok(node, reply.JSON)
    return reply.ok(node)
