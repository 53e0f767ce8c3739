"""`metaproxy network add|list|remove`: networks in the embedded store."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from metaproxy.commands import storeargs
from metaproxy.metadata import model

NAME = "network"
HELP = "add, list or remove networks in the embedded store"


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a network (prints its ID)")
    storeargs.flag(add, "id", help="network ID (default: a new random UUID)")
    storeargs.flag(add, "name", default="", help="display name")
    storeargs.flag(add, "project_id", "--project", default="", help="owning project")
    storeargs.flag(add, "mtu", type=int, help="MTU announced in network_data.json")
    storeargs.flag(
        add,
        "subnet",
        metavar="CIDR[,GATEWAY]",
        action="append",
        default=[],
        help="a subnet, optionally with its gateway (repeat for several)",
    )
    listing = actions.add_parser("list", help="list networks")
    storeargs.add_json_flag(listing)
    remove = actions.add_parser("remove", help="remove networks (refused while ports use them)")
    remove.add_argument("ids", nargs="+", metavar="ID")
    for sub in (add, listing, remove):
        storeargs.add_store_flags(sub)


def document_from_args(args: argparse.Namespace) -> dict[str, Any]:
    subnets = []
    for item in args.subnet:
        cidr, _, gateway = item.partition(",")
        subnets.append({"cidr": cidr, **({"gateway": gateway} if gateway else {})})
    doc: dict[str, Any] = {
        "id": args.id or str(uuid.uuid4()),
        "name": args.name,
        "project_id": args.project_id,
        "subnets": subnets,
    }
    if args.mtu is not None:
        doc["mtu"] = args.mtu
    return doc


def run(args: argparse.Namespace) -> int:
    if args.action == "add":
        network = model.network_from_mapping(document_from_args(args))
        with storeargs.opened(args) as store:
            store.add_network(network)
        print(network.id)
    elif args.action == "list":
        with storeargs.opened(args) as store:
            networks = store.networks()
        if args.json:
            storeargs.print_json([model.network_to_mapping(n) for n in networks])
        else:
            rows = [
                (
                    n.id,
                    n.name or "-",
                    n.project_id or "-",
                    n.mtu or "-",
                    ",".join(s.cidr for s in n.subnets) or "-",
                )
                for n in networks
            ]
            storeargs.print_table(("ID", "NAME", "PROJECT", "MTU", "SUBNETS"), rows)
    else:
        ids = [model.check_id(i, "id") for i in args.ids]
        with storeargs.opened(args) as store:
            with store.transaction():
                for network_id in ids:
                    store.remove_network(network_id)
    return 0
