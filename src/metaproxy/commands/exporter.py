"""`metaproxy export`: dump the whole store as a document `metaproxy import` reads back."""

from __future__ import annotations

import argparse
import sys

from metaproxy.commands import storeargs
from metaproxy.metadata import document

NAME = "export"
HELP = "print the whole store (including passwords) as JSON or YAML"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["json", "yaml"], default="yaml", help="default: yaml")
    storeargs.add_store_flags(parser)


def run(args: argparse.Namespace) -> int:
    with storeargs.opened(args) as store:
        inventory = store.export_inventory()
    sys.stdout.write(document.render(inventory, args.format))
    return 0
