"""Cross-client desynchronisation: one guest aborting mid-request, or leaving before its answer,
must not leak into the next guest's request or response (a risk whenever a front reuses
upstream connections to the agent).
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from attack import fronts, tally
from attack.backend import RawBackend
from attack.client import exchange
from attack.corpus import req
from attack.judge import Truth, check_upstream

pytestmark = pytest.mark.slow
ROUNDS = 15


def _abort(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0), the way a crashing guest leaves."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _record(front: fronts.Front, name: str, problems: list[str]) -> None:
    tally.record(
        "cross-client desync",
        f"{front.engine} front",
        tried=ROUNDS,
        through=len(problems),
        example=f"{name}: {problems[0]}" if problems else None,
    )


def test_aborted_body_does_not_swallow_the_next_request(
    front: fronts.Front, raw_backend: RawBackend
) -> None:
    raw_backend.reset()
    problems: list[str] = []
    for i in range(ROUNDS):
        a = socket.create_connection(front.addr, timeout=3, source_address=("127.0.0.20", 0))
        a.sendall(b"POST /a/%d HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\npartial..." % i)
        _abort(a)
        with socket.create_connection(front.addr, timeout=3, source_address=("127.0.0.21", 0)) as b:
            ex = exchange(front.addr, req(f"/b/{i}"), sock=b, timeout=5)
        if ex.statuses != [200] or f"/b/{i}".encode() not in ex.responses[0].body:
            problems.append(f"round {i}: B got {ex.statuses} {ex.garbage[:60]!r}")
    raw_backend.settle()
    ups, _ = raw_backend.snapshot()
    for up in ups:
        if not up.complete:
            continue
        peer = "127.0.0.21" if up.target.startswith("/b/") else "127.0.0.20"
        problems += [
            f"{up.target}: {p}"
            for p in check_upstream(up, Truth(front.identity_header, front.identity, peer))
        ]
        if b"/b/" in up.body:
            problems.append(f"{up.target} swallowed B's request in its body")
    _record(front, "aborted body, then another guest", problems)
    assert not problems, problems[:5]


def test_guest_leaving_early_never_hands_its_answer_to_another(
    front: fronts.Front, raw_backend: RawBackend
) -> None:
    raw_backend.reset()
    raw_backend.mode, raw_backend.delay = "slow", 0.2
    problems: list[str] = []
    lock = threading.Lock()

    def leaver(i: int) -> None:
        with socket.create_connection(front.addr, timeout=3, source_address=("127.0.0.22", 0)) as a:
            a.sendall(req(f"/leaver/{i}"))
        # closed before the (slow) answer came

    def stayer(i: int) -> None:
        with socket.create_connection(front.addr, timeout=5, source_address=("127.0.0.23", 0)) as b:
            for j in range(2):
                ex = exchange(front.addr, req(f"/stayer/{i}/{j}"), sock=b, timeout=5)
                body = ex.responses[0].body if ex.responses else b""
                if ex.statuses != [200] or f"/stayer/{i}/{j}".encode() not in body:
                    with lock:
                        problems.append(f"stayer {i}/{j} got {ex.statuses} {body[:60]!r}")
                    return

    try:
        for i in range(ROUNDS):
            threads = [
                threading.Thread(target=leaver, args=(i,)),
                threading.Thread(target=stayer, args=(i,)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=20)
    finally:
        raw_backend.reset()
    _record(front, "guest leaves before its answer", problems)
    assert not problems, problems[:5]
