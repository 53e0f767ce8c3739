"""`metaproxy import FILE`: load a whole inventory (JSON or YAML) in one transaction."""

from __future__ import annotations

import argparse

from metaproxy.commands import storeargs
from metaproxy.metadata import document

NAME = "import"
HELP = "load networks, routers, instances and ports from a JSON or YAML file, all or nothing"

MAX_DOCUMENT = 64 * 1024 * 1024


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="inventory document ('-' for stdin)")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace the whole store's content instead of adding to it",
    )
    storeargs.add_store_flags(parser)


def run(args: argparse.Namespace) -> int:
    text = storeargs.read_input(args.file, "file", limit=MAX_DOCUMENT)
    inventory = document.parse(text, source=args.file)
    with storeargs.opened(args) as store:
        store.import_inventory(inventory, replace=args.replace)
    print(
        f"imported {len(inventory.networks)} networks, {len(inventory.routers)} routers, "
        f"{len(inventory.instances)} instances, {len(inventory.ports)} ports"
    )
    return 0
