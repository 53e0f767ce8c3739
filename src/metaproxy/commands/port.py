"""`metaproxy port add|list|remove`: an instance's ports (network, MAC, fixed IPs)."""

from __future__ import annotations

import argparse
import secrets
import uuid
from typing import Any

from metaproxy.commands import storeargs
from metaproxy.metadata import model

NAME = "port"
HELP = "add, list or remove ports (network, MAC, fixed IPs → instance)"


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a port (prints its ID)")
    storeargs.flag(add, "id", help="port ID (default: a new random UUID)")
    storeargs.flag(add, "network_id", "--network", required=True, help="the port's network")
    storeargs.flag(
        add, "instance_id", "--instance", "--device_id", required=True, help="instance UUID"
    )
    storeargs.flag(add, "mac", help="MAC address (default: a random fa:16:3e:xx:xx:xx)")
    storeargs.flag(
        add,
        "fixed_ip",
        "--ip",
        metavar="IP",
        action="append",
        default=[],
        help="a fixed IP, v4 or v6 (repeat for several)",
    )
    storeargs.flag(add, "project_id", "--project", default="", help="default: the instance's")
    listing = actions.add_parser("list", help="list ports")
    storeargs.flag(listing, "network_id", "--network", help="only this network's ports")
    storeargs.flag(listing, "instance_id", "--instance", help="only this instance's ports")
    storeargs.add_json_flag(listing)
    remove = actions.add_parser("remove", help="remove ports")
    remove.add_argument("ids", nargs="+", metavar="ID")
    for sub in (add, listing, remove):
        storeargs.add_store_flags(sub)


def random_mac() -> str:
    """OpenStack's default base MAC prefix, fa:16:3e, with three random octets."""
    return "fa:16:3e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def document_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "id": args.id or str(uuid.uuid4()),
        "network_id": args.network_id,
        "instance_id": args.instance_id,
        "mac": args.mac or random_mac(),
        "fixed_ips": list(args.fixed_ip),
        "project_id": args.project_id,
    }


def run(args: argparse.Namespace) -> int:
    if args.action == "add":
        port = model.port_from_mapping(document_from_args(args))
        with storeargs.opened(args) as store:
            store.add_port(port)
        print(port.id)
    elif args.action == "list":
        with storeargs.opened(args) as store:
            ports = store.ports(network_id=args.network_id, instance_id=args.instance_id)
        if args.json:
            storeargs.print_json([model.port_to_mapping(p) for p in ports])
        else:
            rows = [
                (p.id, p.network_id, p.mac, p.instance_id, ",".join(p.fixed_ips) or "-")
                for p in ports
            ]
            storeargs.print_table(("ID", "NETWORK", "MAC", "INSTANCE", "FIXED IPS"), rows)
    else:
        ids = [model.check_id(i, "id") for i in args.ids]
        with storeargs.opened(args) as store:
            with store.transaction():
                for port_id in ids:
                    store.remove_port(port_id)
    return 0
