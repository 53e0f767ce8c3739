"""Floods against each real front: slow headers, slow bodies, thousands of idle connections and
a request flood, each from one "instance" (a loopback source address). Another instance (another
source address) must still be answered within a second, and the front's memory stays bounded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attack import fronts, tally
from attack.backend import RawBackend
from attack.client import exchange
from attack.corpus import req

pytestmark = pytest.mark.slow

CLS = "floods"
VICTIM_DEADLINE = 1.0
IDLE = 2000
SLOW = 200
RSS_GROWTH_LIMIT_KIB = 64 * 1024


@pytest.fixture(scope="module", params=fronts.engine_params())
def flood_front(
    request: pytest.FixtureRequest, raw_backend: RawBackend, attack_tmp: Path
) -> Iterator[fronts.Front]:
    fronts.raise_nofile(3 * IDLE + 1024)  # the front inherits the raised limit
    engine: str = request.param
    with fronts.running_front(
        engine,
        raw_backend.path,
        attack_tmp / f"flood-{engine}",
        timeouts={"http_request": 10, "http_keep_alive": 10, "client": 10, "server": 5},
    ) as running:
        yield running


def victim_latencies(front: fronts.Front, source: str, n: int = 5) -> list[float]:
    """Time n fresh requests from `source`; a failed one counts as infinitely slow."""
    times = []
    for _ in range(n):
        started = time.monotonic()
        try:
            with socket.create_connection(front.addr, timeout=3, source_address=(source, 0)) as s:
                ex = exchange(front.addr, req(), sock=s, timeout=3)
            ok = ex.statuses == [200]
        except OSError:
            ok = False
        times.append(time.monotonic() - started if ok else float("inf"))
        time.sleep(0.05)
    return times


@contextlib.contextmanager
def connections(front: fronts.Front, source: str, count: int, first: bytes) -> Iterator[int]:
    """Try `count` connections from `source`, each sending `first`; yield how many were tried.

    A front may close the ones over its per-source cap at accept: the attempt still counts (the
    attacker made it), and the loop goes on until `count` attempts or 15 seconds.
    """
    socks: list[socket.socket] = []
    tried = 0
    deadline = time.monotonic() + 15
    try:
        while tried < count and time.monotonic() < deadline:
            tried += 1
            try:
                s = socket.create_connection(front.addr, timeout=0.5, source_address=(source, 0))
            except OSError:
                continue
            socks.append(s)  # closed below even when the send fails (else a ResourceWarning)
            with contextlib.suppress(OSError):
                if first:
                    s.sendall(first)
        yield tried
    finally:
        for s in socks:
            s.close()


def check_victim(front: fronts.Front, name: str, source: str) -> tuple[bool, str]:
    times = victim_latencies(front, source)
    worst = max(times)
    ok = worst < VICTIM_DEADLINE and front.alive()
    detail = f"victim worst {worst:.3f}s"
    tally.fault(CLS, f"{front.engine} front", survived=ok, example=f"{name}: {detail}")
    tally.note(f"{front.engine} front, {name}: {detail}")
    return ok, detail


def test_slow_headers(flood_front: fronts.Front, raw_backend: RawBackend) -> None:
    raw_backend.reset()
    with connections(flood_front, "127.0.0.2", SLOW, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ") as n:
        ok, detail = check_victim(flood_front, f"slowloris headers x{n}", "127.0.0.3")
    assert ok, detail


def test_slow_bodies(flood_front: fronts.Front, raw_backend: RawBackend) -> None:
    raw_backend.reset()
    head = b"POST /openstack/latest/password HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nab"
    with connections(flood_front, "127.0.0.4", SLOW, head) as n:
        ok, detail = check_victim(flood_front, f"slow bodies x{n}", "127.0.0.5")
    assert ok, detail


def test_idle_connections_and_memory(flood_front: fronts.Front, raw_backend: RawBackend) -> None:
    raw_backend.reset()
    pid = flood_front.proc.pid
    before = fronts.rss_kib(pid)
    with connections(flood_front, "127.0.0.6", IDLE, b"") as n:
        time.sleep(0.5)
        during = fronts.rss_kib(pid)
        ok, detail = check_victim(flood_front, f"{n} idle connections", "127.0.0.7")
    time.sleep(0.5)
    after = fronts.rss_kib(pid)
    grew = after - before
    mem_ok = grew < RSS_GROWTH_LIMIT_KIB
    tally.fault(
        CLS,
        f"{flood_front.engine} front",
        survived=mem_ok,
        example=f"memory {before}->{during}->{after} KiB",
    )
    tally.note(
        f"{flood_front.engine} front RSS: {before} KiB, {during} with {n} idle, {after} after"
    )
    assert ok, detail
    assert mem_ok, (before, during, after)


def test_request_flood_from_one_instance(
    flood_front: fronts.Front, raw_backend: RawBackend
) -> None:
    raw_backend.reset()
    stop = threading.Event()
    sent = [0]

    def hammer() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn = socket.create_connection(
                    flood_front.addr, timeout=3, source_address=("127.0.0.8", 0)
                )
                with conn:
                    for _ in range(200):
                        if stop.is_set():
                            break
                        ex = exchange(flood_front.addr, req(), sock=conn, timeout=3)
                        sent[0] += 1
                        if ex.closed or ex.statuses != [200]:
                            break

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(16)]
    pid = flood_front.proc.pid
    before = fronts.rss_kib(pid)
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        ok, detail = check_victim(flood_front, "request flood (16 clients)", "127.0.0.9")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    after = fronts.rss_kib(pid)
    tally.note(f"{flood_front.engine} front flood: {sent[0]} requests, RSS {before}->{after} KiB")
    assert ok, f"{detail} (flood sent {sent[0]})"
    assert after - before < RSS_GROWTH_LIMIT_KIB


BUILTIN = [p for p in fronts.engine_params() if getattr(p, "id", "") == "builtin"]


@pytest.mark.parametrize("engine", BUILTIN)
def test_rate_limit_holds_one_instance_back(
    engine: str, raw_backend: RawBackend, attack_tmp: Path
) -> None:
    """Neutron's per-source rate limit (builtin engine): the flooder gets 429, others do not."""
    rate = (
        "--rate_limit_enabled",
        "--base_query_rate_limit",
        "20",
        "--burst_query_rate_limit",
        "10",
        "--base_window_duration",
        "10",
        "--burst_window_duration",
        "2",
    )
    raw_backend.reset()
    with fronts.running_front(
        engine, raw_backend.path, attack_tmp / f"rate-{engine}", extra=rate
    ) as front:
        statuses = []
        for _ in range(60):
            with socket.create_connection(
                front.addr, timeout=3, source_address=("127.0.0.12", 0)
            ) as s:
                ex = exchange(front.addr, req(), sock=s, timeout=3)
            statuses.append(ex.statuses[0] if ex.statuses else 0)
        served = statuses.count(200)
        limited = statuses.count(429)
        ok_flooder = served <= 20 and limited >= 40 - 1 and set(statuses) <= {200, 429}
        ok, detail = check_victim(front, "rate-limited flooder (60 requests)", "127.0.0.13")
        tally.fault(
            CLS,
            f"{engine} front",
            survived=ok_flooder,
            example=f"flooder: {served} served, {limited} got 429",
        )
        tally.note(f"{engine} front rate limit: flooder {served} served / {limited} x 429")
        assert ok_flooder, statuses
        assert ok, detail
        upstream_from_flooder = len(raw_backend.snapshot()[0])
        assert upstream_from_flooder <= 20 + 5, upstream_from_flooder
