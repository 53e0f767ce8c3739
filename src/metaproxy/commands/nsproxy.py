"""`metaproxy ns-proxy`: one front for one network or router, flag-compatible with Neutron's."""

from __future__ import annotations

import argparse
from pathlib import Path

from metaproxy.config import (
    FrontSpec,
    Identity,
    IdentityKind,
    Timeouts,
    default_bind_address,
    default_port,
    resolve_group,
    resolve_user,
)

NAME = "ns-proxy"
HELP = "serve metadata for one network or router (Neutron's neutron-ns-metadata-proxy)"

DEFAULT_STATE_PATH = Path("/var/lib/metaproxy")


def _flag(parser: argparse._ActionsContainer, name: str, **kwargs: object) -> None:
    """Add `--name_with_underscores` and its `--dashed-spelling` as one option."""
    dashed = name.replace("_", "-")
    spellings = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)  # type: ignore[arg-type]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Exactly one of --network_id / --router_id. Stop a front and remove everything it made "
        "by running the same command with --destroy. Options accept Neutron's underscore "
        "spellings and dashed ones (--network-id)."
    )
    who = parser.add_argument_group("identity (exactly one)")
    _flag(who, "network_id", metavar="ID", help="serve the network with this ID")
    _flag(who, "router_id", metavar="ID", help="serve the router with this ID (port 9697)")

    where = parser.add_argument_group("where to listen")
    _flag(where, "netns", metavar="NAME", help="serve inside this network namespace")
    _flag(
        where,
        "bind_address",
        metavar="ADDR",
        help="address to listen on (default 169.254.169.254 for a network, 0.0.0.0 for a router)",
    )
    _flag(where, "interface", metavar="IFACE", help="interface for an IPv6 link-local address")
    _flag(
        where,
        "metadata_port",
        metavar="PORT",
        type=int,
        help="TCP port to listen on (default 80 for a network, 9697 for a router)",
    )

    upstream = parser.add_argument_group("upstream and files")
    _flag(
        upstream,
        "metadata_proxy_socket",
        metavar="PATH",
        type=Path,
        help="the metadata agent's Unix socket (default STATE_PATH/metadata_proxy)",
    )
    _flag(
        upstream,
        "state_path",
        metavar="DIR",
        type=Path,
        default=DEFAULT_STATE_PATH,
        help=f"where configs and pidfiles live (default {DEFAULT_STATE_PATH})",
    )
    _flag(upstream, "pid_file", metavar="PATH", type=Path, help="write the front's pid here")
    _flag(upstream, "metadata_proxy_user", metavar="USER", help="run as this user (name or uid)")
    _flag(upstream, "metadata_proxy_group", metavar="GROUP", help="run as this group (name or gid)")

    engine = parser.add_argument_group("engine")
    _flag(
        engine,
        "engine",
        choices=["builtin", "haproxy"],
        default="builtin",
        help="builtin (asyncio, default) or haproxy (one hardened haproxy per network)",
    )
    for name, default in (
        ("http_request", 30.0),
        ("connect", 30.0),
        ("client", 32.0),
        ("server", 32.0),
        ("http_keep_alive", 30.0),
    ):
        _flag(
            engine,
            f"timeout_{name}",
            metavar="SECONDS",
            type=float,
            default=default,
            help=f"haproxy 'timeout {name.replace('_', '-')}' (default {default:g})",
        )

    hap = parser.add_argument_group("haproxy engine")
    _flag(
        hap,
        "haproxy_binary",
        metavar="PATH",
        help="absolute path of haproxy (default: the first trusted of /usr/sbin/haproxy, "
        "/usr/bin/haproxy); never looked up in $PATH. It, its symlink target and every "
        "directory above must be root-owned and not group/world-writable",
    )
    _flag(
        hap,
        "allowed_binary_dirs",
        metavar="DIR:DIR",
        help="directories a binary may be run from, ':'- or ','-separated (default "
        "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin)",
    )

    action = parser.add_argument_group("action")
    _flag(
        action,
        "foreground",
        action="store_true",
        help="stay attached and serve until SIGTERM/SIGINT, then stop and remove what was made "
        "(default: detach, returning once the front serves with its pid in --pid_file)",
    )
    _flag(
        action,
        "destroy",
        action="store_true",
        help="stop the front started with these identity/state flags and remove its files",
    )

    builtin = parser.add_argument_group("builtin engine")
    _flag(builtin, "log_file", metavar="PATH", type=Path, help="detached: append logs here")
    _flag(
        builtin,
        "workers",
        metavar="N",
        type=int,
        help="serve with N processes, 1 to 64 (default 1: one process). More use more cores "
        "for a busy network, at the cost of one process's memory each: a parent (root) keeps "
        "N listening sockets, and the kernel sends every connection from one source address "
        "to the same worker, so the per-source connection cap and rate limit stay exact "
        "(loopback clients, never instances, are spread by source port: their limits apply "
        "per worker). The network's maxconn is split: each worker takes at most "
        "ceil(maxconn/N), never more than maxconn in all. One instance still gets one core",
    )
    _flag(
        builtin,
        "pipeline",
        metavar="N",
        type=int,
        help="GETs of different instances in flight at once on one agent connection, 1 to 64 "
        "(default 8; 1: never). Only on a connection whose agent has echoed the "
        "X-Metaproxy-Seq number of a request, as metaproxy's agent does, and every answer on "
        "it must carry the number of the request it answers, or the connection ends with "
        "502: an answer is never relayed to the wrong instance. Neutron's agent does not "
        "echo, so it is never sent more than one request at a time",
    )

    limits = parser.add_argument_group(
        "per-source limits (both engines)",
        "What one instance address may use. Neutron's [metadata_rate_limiting] options: rates "
        "are sliding-window estimates per source address, counted for every request that "
        "passes the front's checks; one over either limit gets 429.",
    )
    _flag(
        limits,
        "max_conn_per_source",
        metavar="N",
        type=int,
        help="concurrent connections one instance address may hold (default 64); builtin "
        "answers one more with 429, haproxy closes it",
    )
    _flag(
        limits,
        "rate_limit_enabled",
        action="store_const",
        const=True,
        help="refuse a source over the rate limits below with 429 (default off)",
    )
    _flag(
        limits,
        "ip_versions",
        metavar="4,6",
        help="rate limit sources of these IP versions (default 4)",
    )
    for name, what in (
        ("base_window_duration", "seconds of the base window (default 10)"),
        ("burst_window_duration", "seconds of the burst window (default 10)"),
    ):
        _flag(limits, name, metavar="SECONDS", type=float, help=what)
    for name, what in (
        ("base_query_rate_limit", "requests allowed per base window (default 10)"),
        ("burst_query_rate_limit", "requests allowed per burst window (default 10)"),
    ):
        _flag(limits, name, metavar="N", type=int, help=what)


def spec_from_args(args: argparse.Namespace) -> FrontSpec:
    """Build the FrontSpec from flags; a missing or doubled identity is a ConfigError (exit 2)."""
    from metaproxy.errors import ConfigError

    if bool(args.network_id) == bool(args.router_id):
        raise ConfigError("exactly one of --network_id and --router_id is required", key="identity")
    kind: IdentityKind = "network" if args.network_id else "router"
    identity = Identity(kind, args.network_id or args.router_id)
    state_path: Path = args.state_path.absolute()
    socket = args.metadata_proxy_socket or state_path / "metadata_proxy"
    return FrontSpec(
        identity=identity,
        upstream_socket=Path(socket).absolute(),
        bind_address=args.bind_address or default_bind_address(kind),
        port=args.metadata_port if args.metadata_port is not None else default_port(kind),
        state_path=state_path,
        netns=args.netns,
        interface=args.interface,
        pid_file=args.pid_file.absolute() if args.pid_file else None,
        user=resolve_user(args.metadata_proxy_user, key="metadata_proxy_user"),
        group=resolve_group(args.metadata_proxy_group, key="metadata_proxy_group"),
        timeouts=Timeouts(
            http_request=args.timeout_http_request,
            connect=args.timeout_connect,
            client=args.timeout_client,
            server=args.timeout_server,
            http_keep_alive=args.timeout_http_keep_alive,
        ),
    )


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.engine == "haproxy":
        from metaproxy.errors import ConfigError

        if args.workers not in (None, 1):
            raise ConfigError("--workers is for the builtin engine", key="workers")
        if args.pipeline is not None:
            raise ConfigError("--pipeline is for the builtin engine", key="pipeline")
        from metaproxy.haproxy import engine as haproxy_engine

        if args.destroy:
            return haproxy_engine.destroy_ns_proxy(spec, args)
        return haproxy_engine.run_ns_proxy(spec, args)
    from metaproxy.front import builtin

    if args.destroy:
        return builtin.destroy_ns_proxy(spec, args)
    return builtin.run_ns_proxy(spec, args)
