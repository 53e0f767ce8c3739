"""`metaproxy check-config`: load and validate the config of `metaproxy up`, print it masked."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from metaproxy.service import settings

NAME = "check-config"
HELP = "validate the config of 'metaproxy up' and print the effective values (secrets masked)"


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        type=Path,
        default=os.environ.get("METAPROXY_CONFIG") or None,
        help="TOML config file (default: $METAPROXY_CONFIG, else the embedded defaults); "
        "METAPROXY_<SECTION>__<KEY> variables override its values",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_flag(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def render(data: dict[str, Any]) -> str:
    """A readable, TOML-like rendering of `settings.describe`."""
    lines = [f"# source: {data['source']}"]
    for section, value in data.items():
        if section == "source":
            continue
        if isinstance(value, list):
            for item in value:
                lines.append(f"\n[[{section}]]")
                lines.extend(f"{k} = {_show(v)}" for k, v in item.items())
            if not value:
                lines.append(f"\n# no {section} declared in the file (the store may add some)")
            continue
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_show(v)}" for k, v in value.items())
    return "\n".join(lines)


def _show(value: object) -> str:
    return json.dumps(value)


def run(args: argparse.Namespace) -> int:
    cfg = settings.load(args.config, os.environ)
    data = settings.describe(cfg)
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0
