"""`metaproxy agent`, unchanged, with its store reads counted (for the warm-cache check).

`python -m bench.agentchild COUNTER_FILE METAPROXY_ARGS...` wraps the SQLite store's three
PortDirectory methods to add one to a 64-bit counter in an mmap'd file, then runs the real
`metaproxy agent` command line. The parent reads the counter at any moment, without asking.
"""

from __future__ import annotations

import functools
import mmap
import struct
import sys
from collections.abc import Callable
from typing import Any


def counting(counter: mmap.mmap, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        struct.pack_into("<Q", counter, 0, struct.unpack_from("<Q", counter, 0)[0] + 1)
        return method(*args, **kwargs)

    return wrapper


def read(path: str) -> int:
    with open(path, "rb") as fh:
        return int(struct.unpack("<Q", fh.read(8))[0])


def main(argv: list[str]) -> int:
    path = argv[1]
    with open(path, "wb") as fh:
        fh.write(b"\0" * 8)
    with open(path, "r+b") as fh:
        counter = mmap.mmap(fh.fileno(), 8)
    from metaproxy import cli
    from metaproxy.metadata.store import SqliteStore

    for name in ("ports_by_ip", "ports_by_mac", "router_networks"):
        setattr(SqliteStore, name, counting(counter, getattr(SqliteStore, name)))
    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
