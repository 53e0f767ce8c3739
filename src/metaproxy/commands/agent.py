"""`metaproxy agent`: the metadata agent on its Unix socket, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from metaproxy.agent.config import AgentConfig, is_neutron_ini, load, parse_metadata_url
from metaproxy.config import read_toml
from metaproxy.errors import ConfigError
from metaproxy.metadata.config import STORE_FILENAME, StoreConfig
from metaproxy.metadata.store import SqliteStore
from metaproxy.runtime import settle_gc

log = logging.getLogger(__name__)

NAME = "agent"
HELP = "run the metadata agent: identify, sign and relay the fronts' requests (Unix socket)"

DEFAULT_STORE = Path("/var/lib/metaproxy") / STORE_FILENAME


def _flag(parser: argparse._ActionsContainer, name: str, **kwargs: Any) -> None:
    """`--name_with_underscores` and `--dashed-spelling` as one option."""
    dashed = name.replace("_", "-")
    spellings = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "--config takes metaproxy's TOML file (the [agent] table) or a Neutron "
        "metadata_agent.ini (recognised by its [DEFAULT] section). Flags override the file. "
        "The shared secret is never taken from the command line (other users can read it in "
        "ps): use the file, METAPROXY_AGENT__SHARED_SECRET, or --shared_secret_file."
    )
    _flag(parser, "config", metavar="FILE", type=Path, help="TOML or Neutron INI config file")
    _flag(
        parser,
        "metadata_proxy_socket",
        metavar="PATH",
        type=Path,
        help="the Unix socket the fronts connect to",
    )
    _flag(
        parser,
        "metadata_proxy_socket_mode",
        choices=["user", "group", "all", "deduce"],
        help="socket mode: user 0644, group 0664, all 0666, deduce (Neutron's rule)",
    )
    _flag(parser, "metadata_proxy_user", metavar="USER", help="the fronts' user (for deduce)")
    _flag(parser, "metadata_proxy_group", metavar="GROUP", help="the fronts' group (for deduce)")
    _flag(parser, "metadata_backlog", metavar="N", type=int, help="listen backlog")
    _flag(parser, "metadata_workers", metavar="N", type=int, help="worker processes")
    _flag(
        parser,
        "metadata_url",
        metavar="URL",
        help="metadata server: http(s)://host:port, unix:/path or http+unix://%%2Fpath",
    )
    _flag(
        parser,
        "shared_secret_file",
        metavar="FILE",
        help="read the shared secret from this file (first line)",
    )
    _flag(parser, "cache_ttl", metavar="SECONDS", type=float, help="port cache lifetime")
    _flag(
        parser,
        "pipeline",
        metavar="N",
        type=int,
        help="GETs in flight at once per upstream connection (1: no pipelining; more only for "
        "a server that answers pipelined requests in order, such as the embedded one)",
    )
    _flag(
        parser,
        "store",
        metavar="PATH",
        type=Path,
        help=f"the metaproxy store to look ports up in (default: [store] path or {DEFAULT_STORE})",
    )


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[AgentConfig, Path]:
    """The effective agent config and store path: file, then environment, then flags."""
    store: Path | None = args.store
    if args.shared_secret_file:
        # As an environment override, so that it also fills a file's missing secret.
        environ = {**environ, "METAPROXY_AGENT__SHARED_SECRET_FILE": args.shared_secret_file}
    if args.config is not None:
        config = load(args.config, environ)
        if store is None and not _is_ini(args.config):
            store = _store_from_toml(args.config, environ)
    else:
        config = AgentConfig.from_mapping({}, environ)
    return _apply_flags(config, args), (store or DEFAULT_STORE).absolute()


def _is_ini(path: Path) -> bool:
    try:
        return is_neutron_ini(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return False


def _store_from_toml(path: Path, environ: Mapping[str, str]) -> Path:
    table = read_toml(path).get("store", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [store] must be a table", key="store")
    return StoreConfig.from_mapping(table, environ).path


def _apply_flags(config: AgentConfig, args: argparse.Namespace) -> AgentConfig:
    changes: dict[str, Any] = {}
    if args.metadata_proxy_socket is not None:
        changes["socket_path"] = args.metadata_proxy_socket.absolute()
    if args.metadata_proxy_socket_mode is not None:
        changes["socket_mode"] = args.metadata_proxy_socket_mode
    if args.metadata_proxy_user is not None:
        changes["proxy_user"] = args.metadata_proxy_user
    if args.metadata_proxy_group is not None:
        changes["proxy_group"] = args.metadata_proxy_group
    if args.metadata_backlog is not None:
        changes["backlog"] = args.metadata_backlog
    if args.metadata_workers is not None:
        changes["workers"] = args.metadata_workers
    if args.cache_ttl is not None:
        changes["cache_ttl"] = args.cache_ttl
    upstream: dict[str, Any] = {}
    if args.metadata_url is not None:
        upstream.update(_url_fields(args.metadata_url))
    if args.pipeline is not None:
        upstream["pipeline"] = args.pipeline
    if upstream:
        changes["upstream"] = dataclasses.replace(config.upstream, **upstream)
    return dataclasses.replace(config, **changes) if changes else config


def _url_fields(url: str) -> dict[str, Any]:
    fields = parse_metadata_url(url)
    fields.setdefault("unix_path", None)
    return fields


def open_directory(path: Path) -> SqliteStore:
    """Open the metaproxy store; the agent reads only its PortDirectory side."""
    if not path.exists():
        raise ConfigError(
            f"store {path} does not exist (create it with `metaproxy network add` etc., "
            "or point --store at it)",
            key="store.path",
        )
    return SqliteStore(path)


def run(args: argparse.Namespace) -> int:
    from metaproxy.agent.workers import run_workers, worker_main

    config, store = config_from_args(args, os.environ)
    if config.workers > 1:
        open_directory(store).close()  # fail here, before forking, if the store is unusable
        return run_workers(config, lambda: open_directory(store), run_loop)
    directory = open_directory(store)
    try:
        run_loop(worker_main(config, directory, None))
    finally:
        directory.close()
    return 0


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed (several times faster here), else asyncio."""
    if not os.environ.get("MP_NO_SETTLE"):
        settle_gc()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
