"""What every store-administration command shares: finding the store, and printing results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metaproxy.config import read_toml
from metaproxy.errors import ConfigError
from metaproxy.metadata.config import DEFAULT_STATE_PATH, StoreConfig
from metaproxy.metadata.store import SqliteStore, open_store


def flag(parser: argparse._ActionsContainer, name: str, *aliases: str, **kwargs: Any) -> None:
    """Add `--dashed-name`, its `--underscore_spelling` and any aliases as one option."""
    dashed = name.replace("_", "-")
    spellings = [f"--{dashed}"] + ([f"--{name}"] if dashed != name else []) + list(aliases)
    parser.add_argument(*spellings, dest=name, **kwargs)


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    """--store PATH > --config FILE's [store] path > --state_path DIR/metaproxy.db."""
    group = parser.add_argument_group("store")
    flag(group, "store", metavar="PATH", type=Path, help="the store's SQLite file")
    flag(group, "config", metavar="FILE", type=Path, help="TOML config ([store] path=...)")
    flag(
        group,
        "state_path",
        metavar="DIR",
        type=Path,
        help=f"directory holding metaproxy.db (default {DEFAULT_STATE_PATH})",
    )


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def store_config(args: argparse.Namespace) -> StoreConfig:
    """Resolve the store's location from flags, the config file and METAPROXY_STORE__PATH."""
    table: dict[str, Any] = {}
    state_path = DEFAULT_STATE_PATH
    if getattr(args, "config", None):
        doc = read_toml(args.config)
        table = dict(doc.get("store", {}))
        service = doc.get("service", {})
        if isinstance(service, dict) and service.get("state_path"):
            state_path = Path(service["state_path"])
    if getattr(args, "state_path", None):
        state_path = args.state_path
    if getattr(args, "store", None):
        table["path"] = str(args.store)
    if not isinstance(table, dict):
        raise ConfigError("[store] must be a table", key="store")
    return StoreConfig.from_mapping(table, os.environ, state_path=state_path.absolute())


@contextmanager
def opened(args: argparse.Namespace) -> Iterator[SqliteStore]:
    """The store the flags name, closed afterwards."""
    store = open_store(store_config(args).path)
    try:
        yield store
    finally:
        store.close()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """An aligned plain-text table; the last column is not padded."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False))
        print(f"{line}  {row[-1]}" if line else row[-1])


def print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def read_input(path: str, what: str, *, limit: int = 1 << 20) -> bytes:
    """Read a file named on the command line ('-' is stdin), refusing huge ones."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}", key=what) from exc
    if len(data) > limit:
        raise ConfigError(f"{what}: {path} is larger than {limit} bytes", key=what)
    return data
