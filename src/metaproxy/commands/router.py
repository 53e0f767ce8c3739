"""`metaproxy router add|list|remove|attach|detach`: routers and the networks they serve."""

from __future__ import annotations

import argparse
import uuid

from metaproxy.commands import storeargs
from metaproxy.metadata import model

NAME = "router"
HELP = "add, list, remove routers; attach or detach their networks"


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a router (prints its ID)")
    storeargs.flag(add, "id", help="router ID (default: a new random UUID)")
    storeargs.flag(add, "name", default="", help="display name")
    storeargs.flag(add, "project_id", "--project", default="", help="owning project")
    storeargs.flag(
        add,
        "network_id",
        "--network",
        metavar="ID",
        action="append",
        default=[],
        help="attach this network (repeat for several)",
    )
    listing = actions.add_parser("list", help="list routers and their networks")
    storeargs.add_json_flag(listing)
    remove = actions.add_parser("remove", help="remove routers (their networks stay)")
    remove.add_argument("ids", nargs="+", metavar="ID")
    attach = actions.add_parser("attach", help="attach a network to a router")
    detach = actions.add_parser("detach", help="detach a network from a router")
    for sub in (attach, detach):
        sub.add_argument("router")
        sub.add_argument("network")
    for sub in (add, listing, remove, attach, detach):
        storeargs.add_store_flags(sub)


def run(args: argparse.Namespace) -> int:
    if args.action == "add":
        router = model.router_from_mapping(
            {
                "id": args.id or str(uuid.uuid4()),
                "name": args.name,
                "project_id": args.project_id,
                "networks": list(args.network_id),
            }
        )
        with storeargs.opened(args) as store:
            store.add_router(router)
        print(router.id)
    elif args.action == "list":
        with storeargs.opened(args) as store:
            routers = store.routers()
        if args.json:
            storeargs.print_json([model.router_to_mapping(r) for r in routers])
        else:
            rows = [
                (r.id, r.name or "-", r.project_id or "-", ",".join(r.networks) or "-")
                for r in routers
            ]
            storeargs.print_table(("ID", "NAME", "PROJECT", "NETWORKS"), rows)
    elif args.action in ("attach", "detach"):
        router_id = model.check_id(args.router, "router")
        network_id = model.check_id(args.network, "network")
        with storeargs.opened(args) as store:
            if args.action == "attach":
                store.attach(router_id, network_id)
            else:
                store.detach(router_id, network_id)
    else:
        ids = [model.check_id(i, "id") for i in args.ids]
        with storeargs.opened(args) as store:
            with store.transaction():
                for router_id in ids:
                    store.remove_router(router_id)
    return 0
