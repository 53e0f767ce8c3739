"""The deadline sweep that replaced a TimerHandle per request (http/ticker.py)."""

from __future__ import annotations

import asyncio

from metaproxy.http.ticker import MAX_INTERVAL, MIN_INTERVAL, Ticker


class Member:
    """Expires its deadlines when swept; has nothing left once all have expired."""

    def __init__(self, *deadlines: float) -> None:
        self.deadlines = list(deadlines)
        self.late: list[float] = []  # how late each deadline expired
        self.sweeps = 0

    def sweep(self, now: float) -> bool:
        self.sweeps += 1
        self.late += [now - d for d in self.deadlines if d <= now]
        self.deadlines = [d for d in self.deadlines if d > now]
        return bool(self.deadlines)


async def _until(condition: object, limit: float = 5.0) -> None:
    async with asyncio.timeout(limit):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_deadlines_expire_soon_after_they_pass() -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker()
    now = loop.time()
    member = Member(now + 0.1, now + 0.3)
    ticker.watch(member, 0.4)
    assert ticker.interval == 0.1
    await _until(lambda: len(member.late) == 2)
    assert all(0 <= late < 0.1 + 0.5 for late in member.late), member.late  # 0.5: a busy host


async def test_the_ticker_stops_when_nothing_is_watched() -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker()
    member = Member(loop.time() + 0.02)
    ticker.watch(member, 0.04)
    await _until(lambda: not ticker._members)
    assert ticker._handle is None
    sweeps = member.sweeps
    await asyncio.sleep(0.1)
    assert member.sweeps == sweeps


def test_interval_bounds() -> None:
    async def interval(shortest: float) -> float:
        ticker = Ticker()
        ticker.watch(Member(), shortest)
        ticker.close()
        return ticker.interval

    assert asyncio.run(interval(3600)) == MAX_INTERVAL
    assert asyncio.run(interval(0.5)) == 0.125
    assert asyncio.run(interval(0.001)) == MIN_INTERVAL


async def test_a_shorter_timeout_brings_the_next_tick_forward() -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker()
    ticker.watch(Member(loop.time() + 100), 30)
    assert ticker._handle is not None
    assert ticker._handle.when() > loop.time() + 0.2
    fast = Member(loop.time() + 0.05)
    ticker.watch(fast, 0.1)
    assert ticker._handle.when() <= loop.time() + 0.025
    await _until(lambda: fast.late)
    ticker.close()
