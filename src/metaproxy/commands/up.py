"""`metaproxy up`: run the whole host stack (metadata server, agent, fronts) until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from metaproxy import log as logsetup
from metaproxy.commands.checkconfig import add_config_flag
from metaproxy.service import settings
from metaproxy.service.settings import Config

if TYPE_CHECKING:
    from metaproxy.metadata.store import SqliteStore
    from metaproxy.service.zygote import Zygote

NAME = "up"
HELP = "run the host stack: embedded metadata server, agent and every network's front"

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "With no config file it runs on the embedded defaults: state in /var/lib/metaproxy, "
        "SQLite store, a generated shared secret (0600), the "
        "builtin engine, whose fronts run in an unprivileged worker process (nobody, or "
        "[front] user) that never holds the shared secret ([front] isolate = false keeps them "
        "in this process). SIGHUP re-reads the config; SIGTERM/SIGINT stop it cleanly."
    )
    add_config_flag(parser)
    parser.add_argument(
        "--demo",
        action="store_true",
        help="also create a demo instance and (as root) demo namespaces; removed at stop",
    )
    parser.add_argument("--engine", choices=settings.ENGINES, help="override service.engine")
    add_state_flag(parser)
    parser.add_argument(
        "--metrics",
        metavar="ADDR",
        help="serve Prometheus metrics on HOST:PORT or unix:/PATH (default: service.metrics)",
    )


def add_state_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-path",
        "--state_path",
        dest="state_path",
        metavar="DIR",
        type=Path,
        help="override service.state_path",
    )


def effective_config(args: argparse.Namespace, *, demo_state: Path | None = None) -> Config:
    """The config file, the environment, then the command line (as the most specific override)."""
    environ = dict(os.environ)
    state = args.state_path or demo_state
    if state is not None:
        environ["METAPROXY_SERVICE__STATE_PATH"] = str(state.absolute())
    if args.engine:
        environ["METAPROXY_SERVICE__ENGINE"] = args.engine
    if args.metrics:
        environ["METAPROXY_SERVICE__METRICS"] = args.metrics
    return settings.load(args.config, environ)


def _setup_logging(cfg: Config, cli_level: str) -> None:
    level = cli_level if cli_level != "INFO" else cfg.service.log_level
    logsetup.setup(level, target=cfg.service.log_target)


def run(args: argparse.Namespace) -> int:
    demo_state = None
    if args.demo and args.state_path is None and args.config is None:
        # A demo must not write into a real deployment's state: it gets its own, removed at stop.
        demo_state = Path(tempfile.mkdtemp(prefix="metaproxy-demo-"))
    # Before the config (and the shared secret in it) is read: front workers are forked from
    # this process, so they never hold a copy of the secret (service/zygote.py).
    from metaproxy.service.zygote import Zygote

    zygote = Zygote.start()
    try:
        cfg = effective_config(args, demo_state=demo_state)
        _setup_logging(cfg, args.log_level)
        _install_uvloop()
        return asyncio.run(_main(cfg, args, zygote))
    finally:
        zygote.close()
        if demo_state is not None:
            shutil.rmtree(demo_state, ignore_errors=True)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _main(cfg: Config, args: argparse.Namespace, zygote: Zygote | None = None) -> int:
    from metaproxy.security import files
    from metaproxy.service.host import Host, ensure_secret

    files.ensure_private_dir(cfg.service.state_path)
    cfg = ensure_secret(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    demo = None
    extra = []
    if args.demo:
        from metaproxy.service.demo import Demo
        from metaproxy.service.roles import open_configured_store

        demo = Demo()
        demo_store = open_configured_store(cfg)
        try:
            extra.append(demo.setup(demo_store))
        except BaseException:
            demo.teardown(demo_store)
            raise
        finally:
            demo_store.close()
    host = Host(cfg, extra_fronts=extra, config_path=args.config, environ=os.environ, zygote=zygote)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, host.request_reload)
    runner = asyncio.create_task(host.run(stop))
    try:
        if demo is not None:
            waiter = asyncio.create_task(host.ready.wait())
            await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if host.ready.is_set():
                status = f"{_program()} status --state-path {cfg.service.state_path}"
                prefix = "sudo " if os.geteuid() == 0 else ""
                print(demo.instructions(prefix + status), file=sys.stdout, flush=True)
        await runner
        if host.failure is not None:
            return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if demo is not None:
            from metaproxy.service.roles import open_configured_store

            store: SqliteStore | None = None
            try:
                store = open_configured_store(cfg)
            except Exception as exc:
                log.error("demo: cannot open the store to remove the demo records: %s", exc)
            demo.teardown(store)
            if store is not None:
                store.close()
    return 0


def _program() -> str:
    """How to call this metaproxy again (scripts/demo runs .venv/bin/metaproxy, not on PATH)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "metaproxy" and argv0.exists():
        return str(argv0.absolute())
    return "metaproxy"
