"""A broken agent behind each real front: gone, refusing, slow, hanging, garbage, closing early,
restarting. The front must answer fast with 503 / 504 / 502 and recover by itself.

Timeouts are set small on the command line (`--timeout_server 1`, `--timeout_connect 1`), so
"fast" here means within a few of those seconds on a loaded 2-core machine.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attack import fronts, tally
from attack.backend import RawBackend
from attack.client import Exchange, exchange
from attack.corpus import req

pytestmark = pytest.mark.slow

SERVER_TIMEOUT = 1.0
FAST = 4.0  # seconds: an answer slower than this is not "fast"
CLS = "agent faults"


@pytest.fixture(scope="module", params=fronts.engine_params())
def tight_front(
    request: pytest.FixtureRequest, raw_backend: RawBackend, attack_tmp: Path
) -> Iterator[fronts.Front]:
    engine: str = request.param
    with fronts.running_front(
        engine,
        raw_backend.path,
        attack_tmp / f"tight-{engine}",
        timeouts={
            "server": SERVER_TIMEOUT,
            "connect": SERVER_TIMEOUT,
            "http_request": 2,
            "http_keep_alive": 2,
            "client": 5,
        },
    ) as running:
        yield running


def get(front: fronts.Front, timeout: float = 10.0) -> Exchange:
    return exchange(front.addr, req("/latest/meta-data/instance-id"), timeout=timeout)


def survived(front: fronts.Front, name: str, ok: bool, detail: str) -> None:
    tally.fault(CLS, f"{front.engine} front", survived=ok, example=f"{name}: {detail}")
    tally.note(f"{front.engine} front, agent {name}: {detail}")


def recovers(front: fronts.Front, backend: RawBackend, within: float = 3.0) -> bool:
    """The front serves 200 again, by itself, once the agent is healthy."""
    backend.reset()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if get(front, timeout=3).statuses == [200]:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    ("mode", "delay", "statuses"),
    [
        pytest.param("garbage", 0.0, {502}, id="garbage"),
        pytest.param("close", 0.0, {502}, id="closes-without-answer"),
        pytest.param("slow", 3.0, {504}, id="slower-than-timeout"),
        pytest.param("hang", 30.0, {504}, id="never-answers"),
    ],
)
def test_broken_agent_gets_a_fast_clean_status(
    tight_front: fronts.Front, raw_backend: RawBackend, mode: str, delay: float, statuses: set[int]
) -> None:
    raw_backend.reset()
    raw_backend.mode, raw_backend.delay = mode, delay  # type: ignore[assignment]
    ex = get(tight_front)
    ok = ex.statuses and ex.statuses[0] in statuses and ex.elapsed < FAST
    back = recovers(tight_front, raw_backend)
    survived(tight_front, mode, bool(ok and back), f"{ex.statuses} in {ex.elapsed:.2f}s")
    assert ex.statuses and ex.statuses[0] in statuses, (ex.statuses, ex.garbage[:100])
    assert ex.elapsed < FAST, ex.elapsed
    assert back, "the front did not recover by itself"


def test_agent_closing_mid_response_is_never_a_whole_answer(
    tight_front: fronts.Front, raw_backend: RawBackend
) -> None:
    raw_backend.reset()
    raw_backend.mode = "close-mid"
    ex = get(tight_front)
    # 502 if the front had not started answering; otherwise the client must see the truncation
    # (connection closed before Content-Length was met), never a complete-looking response.
    ok = (ex.statuses and ex.statuses[0] == 502) or (not ex.responses and ex.closed)
    back = recovers(tight_front, raw_backend)
    survived(tight_front, "close-mid", bool(ok and back), f"{ex.statuses} closed={ex.closed}")
    assert ok, (ex.statuses, ex.closed, ex.garbage[:100])
    assert ex.elapsed < FAST
    assert back


def test_agent_gone_then_restarted(tight_front: fronts.Front, raw_backend: RawBackend) -> None:
    raw_backend.stop()
    try:
        gone = get(tight_front)
        # A stale socket file nobody listens on: connection refused.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(raw_backend.path))
        stale.close()
        refused = get(tight_front)
    finally:
        raw_backend.path.unlink(missing_ok=True)
        raw_backend.start()
    back = recovers(tight_front, raw_backend)
    for name, ex in (("agent gone", gone), ("stale agent socket", refused)):
        ok = ex.statuses == [503] and ex.elapsed < FAST
        survived(tight_front, name, ok and back, f"{ex.statuses} in {ex.elapsed:.2f}s")
    assert gone.statuses == [503], gone.statuses
    assert refused.statuses == [503], refused.statuses
    assert gone.elapsed < FAST and refused.elapsed < FAST, (gone.elapsed, refused.elapsed)
    assert back, "the front did not resume once the agent was back"
    assert tight_front.alive()


def test_agent_restart_under_keep_alive(tight_front: fronts.Front, raw_backend: RawBackend) -> None:
    """A client on one keep-alive connection across an agent restart keeps getting answers."""
    raw_backend.reset()
    conn = socket.create_connection(tight_front.addr, timeout=5)
    statuses = []
    try:
        for i in range(6):
            if i == 2:
                raw_backend.stop()
            if i == 4:
                raw_backend.start()
            ex = exchange(tight_front.addr, req("/latest/"), sock=conn, timeout=8)
            statuses.append(ex.statuses[0] if ex.statuses else 0)
            if ex.closed or not ex.statuses:
                conn.close()
                conn = socket.create_connection(tight_front.addr, timeout=5)
    finally:
        conn.close()
        if raw_backend._sock is None:
            raw_backend.start()
    ok = statuses[:2] == [200, 200] and set(statuses[2:4]) == {503} and statuses[4:] == [200, 200]
    survived(tight_front, "agent restart (keep-alive client)", ok, str(statuses))
    assert ok, statuses
