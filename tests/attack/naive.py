"""Deliberately vulnerable fronts, to prove the suite catches what it claims to catch.

- `relay`: adds the true identity after the request line and relays the client's bytes
  verbatim (keeps forged headers, smuggles whatever the body hides).
- `first4k`: strips identity headers only from the first 4,096 bytes of the head, Neutron's
  agent flaw, so a padded request's forged headers survive.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

Flavour = Literal["relay", "first4k"]
_IDENTITY_LINE = re.compile(
    rb"^(x-neutron-|x-ovn-|x-instance-id|x-metadata-provider|x-tenant-id|x-forwarded-for|"
    rb"forwarded|x-real-ip)",
    re.IGNORECASE,
)


def _rewrite(head: bytes, flavour: Flavour, peer: str, identity: bytes) -> bytes:
    first, _, rest = head.partition(b"\r\n")
    lines = rest.split(b"\r\n") if rest else []
    if flavour == "first4k":
        kept, offset = [], len(first) + 2
        for line in lines:
            if offset + len(line) <= 4096 and _IDENTITY_LINE.match(line):
                offset += len(line) + 2
                continue
            offset += len(line) + 2
            kept.append(line)
        lines = kept
    ours = [identity, b"X-Forwarded-For: " + peer.encode()]
    return b"\r\n".join([first, *ours, *lines])


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _serve(conn: socket.socket, upstream: Path, flavour: Flavour, identity: bytes) -> None:
    peer = conn.getpeername()[0]
    with conn, socket.socket(socket.AF_UNIX) as up:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        up.connect(str(upstream))
        up.sendall(_rewrite(head, flavour, peer, identity) + b"\r\n\r\n" + rest)
        back = threading.Thread(target=_pump, args=(up, conn), daemon=True)
        back.start()
        _pump(conn, up)
        back.join(timeout=5)


@contextlib.contextmanager
def naive_front(upstream: Path, flavour: Flavour, identity: bytes) -> Iterator[tuple[str, int]]:
    """Serve a vulnerable front on 127.0.0.1; yield its address."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            threading.Thread(
                target=_serve, args=(conn, upstream, flavour, identity), daemon=True
            ).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)
