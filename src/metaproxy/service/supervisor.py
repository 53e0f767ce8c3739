"""Start, watch, respawn and stop child processes (haproxy fronts, the agent, the metadata server).

Contract:
- *start, then register*: `Supervisor.add` starts the child once and raises if that first start
  fails (the caller reports it); only a started child is watched.
- The watcher awaits `proc.wait()` on the process object it started — never polls a bare pid,
  which the kernel may have handed to someone else by then.
- A child that exits is respawned: at once (≤ `Backoff.base`) after a stable run, with capped
  exponential backoff while it keeps dying young. Each respawn is a warning; a crash loop
  (`Backoff.loop_after` quick exits in a row) is an error, and the child keeps being retried at
  the cap rather than given up on — the operator sees it in the log, in status and in metrics.
- *unregister, then stop*: `remove` / `close` stop watching first, then SIGTERM, wait
  `stop_timeout`, SIGKILL, and run the child's `cleanup` (pidfile, config), logging failures.
  `cleanup` runs only then: between respawns the start function itself deals with what the
  dead child left (its config is still needed; its pidfile names a dead pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from metaproxy.errors import MetaproxyError

log = logging.getLogger(__name__)

State = Literal["starting", "running", "backoff", "crashloop", "stopping", "stopped"]
StartFn = Callable[[], Awaitable[asyncio.subprocess.Process]]
CleanupFn = Callable[[], Awaitable[None]]


@dataclass
class Backoff:
    """Delay before the next respawn: quick after a stable run, doubling while it dies young."""

    base: float = 0.25
    cap: float = 30.0
    stable_after: float = 10.0
    loop_after: int = 5
    failures: int = 0

    def next_delay(self, uptime: float) -> float:
        """Record one exit after `uptime` seconds and return how long to wait before respawning."""
        self.failures = 1 if uptime >= self.stable_after else self.failures + 1
        return float(min(self.cap, self.base * 2 ** (self.failures - 1)))

    @property
    def crash_loop(self) -> bool:
        return self.failures >= self.loop_after


@dataclass(frozen=True)
class Drain:
    """A graceful stop before SIGTERM: e.g. haproxy's SIGUSR1 (stop listening, finish requests)."""

    signal: signal.Signals
    timeout: float


async def terminate(
    proc: asyncio.subprocess.Process, timeout: float, *, name: str, drain: Drain | None = None
) -> int:
    """[drain signal, wait], SIGTERM, wait up to `timeout`, then SIGKILL; the exit status."""
    if proc.returncode is not None:
        return proc.returncode
    if drain is not None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(drain.signal)
        try:
            async with asyncio.timeout(drain.timeout):
                return await proc.wait()
        except TimeoutError:
            log.info("%s still busy after %.1f s of draining; stopping it", name, drain.timeout)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout):
            return await proc.wait()
    except TimeoutError:
        log.warning("%s (pid %d) ignored SIGTERM for %.1f s; killing it", name, proc.pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    return await proc.wait()


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Child:
    """One supervised process; use through `Supervisor`."""

    def __init__(
        self,
        name: str,
        start: StartFn,
        *,
        cleanup: CleanupFn | None = None,
        stop_timeout: float = 5.0,
        backoff: Backoff | None = None,
        on_respawn: Callable[[str], None] | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.name = name
        self.drain = drain
        self._start = start
        self._cleanup = cleanup
        self.stop_timeout = stop_timeout
        self.backoff = backoff or Backoff()
        self._on_respawn = on_respawn
        self.proc: asyncio.subprocess.Process | None = None
        self.state: State = "starting"
        self.respawns = 0
        self.last_error = ""
        self.started_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def launch(self) -> None:
        """First start; raises when it fails. Then the watcher owns the process."""
        self.proc = await self._start()
        self.started_at = time.monotonic()
        self.state = "running"
        self._task = asyncio.create_task(self._watch(), name=f"supervise-{self.name}")

    async def _watch(self) -> None:
        while self.state not in ("stopping", "stopped") and self.proc is not None:
            returncode = await self.proc.wait()
            if self.state in ("stopping", "stopped"):
                return
            uptime = time.monotonic() - self.started_at
            delay = self.backoff.next_delay(uptime)
            self.last_error = f"{describe_exit(returncode)} after {uptime:.1f} s"
            if self.backoff.crash_loop:
                self.state = "crashloop"
                log.error(
                    "%s is crash-looping (%d quick exits in a row; last %s); retrying in %.1f s",
                    self.name,
                    self.backoff.failures,
                    self.last_error,
                    delay,
                )
            else:
                self.state = "backoff"
                log.warning("%s %s; respawning in %.2f s", self.name, self.last_error, delay)
            await self._respawn_after(delay)

    async def _respawn_after(self, delay: float) -> None:
        while self.state not in ("stopping", "stopped"):
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            if self.state in ("stopping", "stopped"):
                return
            try:
                self.proc = await self._start()
            except MetaproxyError as exc:
                self.last_error = f"respawn failed: {exc}"
                delay = self.backoff.next_delay(0.0)
                log.error("%s: %s; retrying in %.1f s", self.name, self.last_error, delay)
                continue
            self.started_at = time.monotonic()
            self.respawns += 1
            self.state = "running"
            if self._on_respawn is not None:
                self._on_respawn(self.name)
            log.warning(
                "%s respawned (pid %d, respawn #%d)", self.name, self.proc.pid, self.respawns
            )
            return

    def kick(self) -> None:
        """Skip the rest of a backoff wait (e.g. an operator asked for a restart)."""
        self._wake.set()

    async def stop(self) -> None:
        """Unregister, then stop: no respawn can race the TERM / wait / KILL."""
        self.state = "stopping"
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.proc is not None:
            returncode = await terminate(
                self.proc, self.stop_timeout, name=self.name, drain=self.drain
            )
            log.info("%s stopped (%s)", self.name, describe_exit(returncode))
        if self._cleanup is not None:
            try:
                await self._cleanup()
            except Exception as exc:
                log.error("cleaning up after %s failed: %s", self.name, exc)
        self.state = "stopped"


class Supervisor:
    """A set of named children, each watched by its own task in the running loop."""

    def __init__(
        self,
        *,
        stop_timeout: float = 5.0,
        backoff: Callable[[], Backoff] = Backoff,
        on_respawn: Callable[[str], None] | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.stop_timeout = stop_timeout
        self.drain = drain
        self._backoff = backoff
        self._on_respawn = on_respawn
        self.children: dict[str, Child] = {}

    async def add(self, name: str, start: StartFn, *, cleanup: CleanupFn | None = None) -> Child:
        """Start `name` and supervise it; a failed first start raises (and registers nothing)."""
        if name in self.children:
            raise ValueError(f"{name} is already supervised")
        child = Child(
            name,
            start,
            cleanup=cleanup,
            stop_timeout=self.stop_timeout,
            backoff=self._backoff(),
            on_respawn=self._on_respawn,
            drain=self.drain,
        )
        await child.launch()
        self.children[name] = child
        return child

    async def remove(self, name: str) -> None:
        child = self.children.pop(name, None)
        if child is not None:
            await child.stop()

    async def close(self) -> None:
        """Stop every child concurrently; one slow child does not delay the others' TERM."""
        children = list(self.children.values())
        self.children.clear()
        results = await asyncio.gather(*(c.stop() for c in children), return_exceptions=True)
        for child, result in zip(children, results, strict=True):
            if isinstance(result, BaseException):
                log.error("stopping %s failed: %s", child.name, result)
