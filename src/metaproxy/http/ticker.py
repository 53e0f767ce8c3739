"""One periodic sweep for many deadlines, instead of a TimerHandle per request.

The front's timeouts are seconds long (haproxy's http-request, keep-alive, client, server), so
a deadline may fire a fraction of a second late. Each connection keeps its deadline as a float
(`loop.time() + timeout`), which costs a store per request; a watched member's `sweep(now)`
runs every `interval` s and expires what is due. The ticker runs only while something is
watched: an idle engine schedules nothing.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

# Ticks come at least four times per the shortest timeout watched, within these bounds.
MAX_INTERVAL = 0.25
MIN_INTERVAL = 0.01


class Swept(Protocol):
    def sweep(self, now: float) -> bool:
        """Expire what is due at `now`; False when nothing is left to watch (then unwatched)."""
        ...


class Ticker:
    """Sweeps its members every `interval` s while any is watched (see the module doc)."""

    def __init__(self) -> None:
        self.interval = MAX_INTERVAL
        self._members: dict[Swept, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, member: Swept, shortest: float) -> None:
        """Sweep `member` from now on, until its sweep says it has nothing left.

        `shortest`: its shortest timeout; the ticks become frequent enough for it.
        """
        self._members[member] = None
        loop = self._loop = asyncio.get_running_loop()
        step = min(max(shortest / 4, MIN_INTERVAL), MAX_INTERVAL)
        handle = self._handle
        if step < self.interval:
            self.interval = step
            if handle is not None and handle.when() > loop.time() + step:
                handle.cancel()
                handle = self._handle = None
        if handle is None:
            self._handle = loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._handle = None
        loop = self._loop
        if loop is None:  # closed meanwhile
            return
        now = loop.time()
        for member in list(self._members):
            if not member.sweep(now):
                del self._members[member]
        if self._members and self._handle is None:
            self._handle = loop.call_later(self.interval, self._tick)

    def close(self) -> None:
        """Stop ticking and forget every member."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._members.clear()
        self._loop = None
