"""The padding sweep: forged identity headers placed at EVERY byte offset in a range.

Neutron's agent read only the first 4,096 bytes of a request, so a guest could pad its head
until the front's real headers fell beyond the read and its own forged ones were taken. For each
offset n, the first forged header starts exactly n bytes into the request; the forged block
rotates so every identity header gets its turn across each buffer boundary (4 KiB, 8 KiB).
Requests go over a few keep-alive connections in parallel to keep the sweep fast.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from attack.backend import RawBackend
from attack.client import exchange
from attack.corpus import HOST, IDENTITY_HEADERS
from attack.judge import Truth, check_upstream

_PAD_NAME = b"X-Padding: "
_PATH = re.compile(r"^/pad/(\d+)$")


def padded_request(offset: int) -> bytes:
    """A GET whose first forged identity header starts exactly `offset` bytes in."""
    head = f"GET /pad/{offset} HTTP/1.1\r\n".encode() + HOST + b"\r\n"
    fixed = len(head) + len(_PAD_NAME) + 2
    if offset < fixed + 1:
        raise ValueError(f"offset {offset} too small")
    pad = _PAD_NAME + b"p" * (offset - fixed) + b"\r\n"
    k = offset % len(IDENTITY_HEADERS)
    forged = [*IDENTITY_HEADERS[k:], *IDENTITY_HEADERS[:k]]
    lines = b"".join(f"{name}: {value}\r\n".encode() for name, value in forged)
    raw = head + pad + lines + b"\r\n"
    assert raw.index(forged[0][0].encode()) == offset
    return raw


@dataclass
class SweepResult:
    tried: int = 0
    forwarded: int = 0
    refused: dict[int, int] = field(default_factory=dict)  # status -> count
    failures: list[str] = field(default_factory=list)


def sweep(
    addr: tuple[str, int],
    backend: RawBackend,
    offsets: Iterable[int],
    truth: Truth,
    *,
    workers: int = 4,
    timeout: float = 5.0,
    reuse: bool = True,
) -> SweepResult:
    """Send one padded request per offset; judge every answer and every upstream request."""
    todo = list(offsets)
    backend.reset()
    result = SweepResult(tried=len(todo))
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def work(share: list[int]) -> None:
        conn: socket.socket | None = None
        try:
            for offset in share:
                status = 0
                try:
                    if conn is None:
                        conn = socket.create_connection(addr, timeout=timeout)
                    ex = exchange(addr, padded_request(offset), timeout=timeout, sock=conn)
                    status = ex.statuses[0] if ex.statuses else 0
                    again = status == 200 and not ex.closed and reuse
                except OSError:
                    again = False
                with lock:
                    statuses[offset] = status
                if not again and conn is not None:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=work, args=(todo[i::workers],)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    backend.settle()
    ups, _ = backend.snapshot()
    seen: dict[int, int] = {}
    for up in ups:
        match = _PATH.match(up.target)
        offset = int(match.group(1)) if match else -1
        seen[offset] = seen.get(offset, 0) + 1
        problems = check_upstream(up, truth)
        if problems:
            result.failures.append(f"offset {offset}: {problems[0]}")
    for offset in todo:
        status = statuses.get(offset, 0)
        count = seen.get(offset, 0)
        if status == 200:
            result.forwarded += 1
            if count != 1:
                result.failures.append(f"offset {offset}: 200 but {count} upstream requests")
        elif status >= 400:
            result.refused[status] = result.refused.get(status, 0) + 1
            if count:
                result.failures.append(f"offset {offset}: refused {status} yet forwarded")
        else:
            result.failures.append(f"offset {offset}: no answer (status {status})")
    if -1 in seen:
        result.failures.append(f"{seen[-1]} upstream requests with an unknown target")
    return result
