"""`metaproxy metadata-server`: the embedded metadata server, in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from metaproxy.commands import storeargs
from metaproxy.config import read_toml
from metaproxy.errors import ConfigError
from metaproxy.metadata.config import MetadataConfig
from metaproxy.metadata.server import MetadataServer
from metaproxy.metadata.store import open_store
from metaproxy.runtime import settle_gc

log = logging.getLogger(__name__)

NAME = "metadata-server"
HELP = "serve the OpenStack and EC2 metadata trees from the embedded store (Nova's contract)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Settings come from the config file's [metadata] and [store] sections, then "
        "METAPROXY_METADATA__* environment variables, then these flags. The shared secret must "
        "equal the agent's metadata_proxy_shared_secret; give it in a file, not on the command "
        "line."
    )
    storeargs.flag(
        parser,
        "listen",
        metavar="ADDR",
        help="HOST:PORT, [V6]:PORT or unix:/PATH (default 127.0.0.1:8775)",
    )
    storeargs.flag(
        parser,
        "shared_secret_file",
        "--metadata_proxy_shared_secret_file",
        metavar="FILE",
        help="file holding the shared secret",
    )
    storeargs.flag(
        parser, "tokens", choices=["off", "optional", "required"], help="IMDSv2 session tokens"
    )
    storeargs.add_store_flags(parser)


def metadata_config(args: argparse.Namespace) -> MetadataConfig:
    table: dict[str, Any] = {}
    if args.config:
        section = read_toml(args.config).get("metadata", {})
        if not isinstance(section, dict):
            raise ConfigError("[metadata] must be a table", key="metadata")
        table = dict(section)
    if args.listen:
        table["listen"] = args.listen
    if args.shared_secret_file:
        table.pop("shared_secret", None)
        table["shared_secret_file"] = args.shared_secret_file
    if args.tokens:
        table["tokens"] = args.tokens
    return MetadataConfig.from_mapping(table, os.environ)


async def _serve(server: MetadataServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"serving metadata on {server.address}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def run(args: argparse.Namespace) -> int:
    config = metadata_config(args)
    store = open_store(storeargs.store_config(args).path)
    try:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        if not os.environ.get("MP_NO_SETTLE"):
            settle_gc()
        asyncio.run(_serve(MetadataServer(config, store)))
    finally:
        store.close()
    return 0
