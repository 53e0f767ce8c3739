"""The `metaproxy` command line: subcommands, and errors turned into exit codes and messages."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Protocol, cast

from metaproxy import __version__
from metaproxy import log as logsetup
from metaproxy.errors import MetaproxyError

log = logging.getLogger(__name__)

# Each module defines NAME, HELP, configure(parser) and run(args) -> int.
SUBCOMMANDS: tuple[str, ...] = (
    "metaproxy.commands.nsproxy",
    "metaproxy.commands.agent",
    "metaproxy.commands.checkconfig",
    "metaproxy.commands.up",
    "metaproxy.commands.status",
    "metaproxy.commands.instance",
    "metaproxy.commands.port",
    "metaproxy.commands.network",
    "metaproxy.commands.router",
    "metaproxy.commands.importer",
    "metaproxy.commands.exporter",
    "metaproxy.commands.metadata_server",
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what shells report for a tool cut off by `head`


class _Command(Protocol):
    NAME: str
    HELP: str

    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def build_parser() -> argparse.ArgumentParser:
    """The whole parser tree; importing a subcommand module must stay cheap."""
    parser = argparse.ArgumentParser(
        prog="metaproxy",
        description="Serve instance metadata (http://169.254.169.254/) to VMs on isolated "
        "tenant networks: front proxy, metadata agent and embedded metadata server.",
    )
    parser.add_argument("--version", action="version", version=f"metaproxy {__version__}")
    parser.add_argument(
        "--log-level",
        "--log_level",
        dest="log_level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="lowest level logged to stderr (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMANDS:
        command = cast(_Command, importlib.import_module(module_name))
        sub = subparsers.add_parser(
            command.NAME, help=command.HELP, description=command.HELP, allow_abbrev=False
        )
        command.configure(sub)
        sub.set_defaults(_run=command.run)
    return parser


def _secret_flag(argv: Sequence[str]) -> str | None:
    """The first flag that would carry a secret's value on the command line, if any."""
    for token in argv:
        name = token.split("=", 1)[0].lower().replace("-", "_")
        if name.startswith("__") and "secret" in name and not name.endswith("_file"):
            return token.split("=", 1)[0]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, set up logging, run, and map failures to exit codes."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Refused before argparse sees it: its "unrecognized arguments" error would echo the value,
    # and a secret on the command line is readable by every user through ps.
    flag = _secret_flag(args_list)
    if flag is not None:
        print(
            f"metaproxy: error: {flag}: secrets are never taken on the command line (other "
            "users can read them in ps); use a *_file option, the config file or the "
            "METAPROXY_* environment",
            file=sys.stderr,
        )
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(args_list)
    logsetup.setup(args.log_level)
    try:
        return int(args._run(args))
    except MetaproxyError as exc:
        log.debug("command failed", exc_info=True)
        print(f"metaproxy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `metaproxy instance list | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and exit like a SIGPIPE'd tool.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
