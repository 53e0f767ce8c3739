"""The supervisor with real child processes: respawn, backoff, crash loop, TERM-then-KILL."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from metaproxy.errors import ProcessError
from metaproxy.service.supervisor import Backoff, Drain, Supervisor, describe_exit

SLEEPER = "import time\nwhile True: time.sleep(1)\n"
STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
    "while True: time.sleep(1)\n"
)


def _starter(code: str, starts: list[int]):  # type: ignore[no-untyped-def]
    async def start() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
        )
        starts.append(proc.pid)
        return proc

    return start


async def _until(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("uptimes", "delays"),
    [
        pytest.param([60.0], [0.25], id="stable-run-respawns-at-once"),
        pytest.param([0.1, 0.1, 0.1], [0.25, 0.5, 1.0], id="doubles-while-dying-young"),
        pytest.param([0.1] * 10, [0.25, 0.5, 1, 2, 4, 8, 16, 30, 30, 30], id="capped"),
        pytest.param([0.1, 0.1, 60.0], [0.25, 0.5, 0.25], id="resets-after-stable-run"),
    ],
)
def test_backoff(uptimes: list[float], delays: list[float]) -> None:
    backoff = Backoff()
    assert [backoff.next_delay(u) for u in uptimes] == delays


def test_crash_loop_is_flagged_after_five_quick_exits() -> None:
    backoff = Backoff()
    flags = []
    for _ in range(6):
        backoff.next_delay(0.1)
        flags.append(backoff.crash_loop)
    assert flags == [False, False, False, False, True, True]


@pytest.mark.parametrize(
    ("code", "text"),
    [(0, "exited with status 0"), (3, "exited with status 3"), (-9, "killed by SIGKILL")],
)
def test_describe_exit(code: int, text: str) -> None:
    assert describe_exit(code) == text


async def test_killed_child_is_respawned_within_a_second(caplog: pytest.LogCaptureFixture) -> None:
    starts: list[int] = []
    respawned: list[str] = []
    sup = Supervisor(on_respawn=respawned.append)
    child = await sup.add("sleeper", _starter(SLEEPER, starts))
    try:
        first = child.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await _until(lambda: child.pid not in (None, first) and child.state == "running", 5)
        assert loop.time() - t0 < 1.5
        assert child.respawns == 1
        assert respawned == ["sleeper"]
        assert "killed by SIGKILL" in child.last_error
        assert any(
            r.levelno == logging.WARNING and "respawning" in r.getMessage() for r in caplog.records
        )
    finally:
        await sup.close()
    for pid in starts:
        assert not Path(f"/proc/{pid}").exists() or _zombie_or_gone(pid)


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


async def test_crash_loop_logs_an_error_and_keeps_trying(caplog: pytest.LogCaptureFixture) -> None:
    starts: list[int] = []
    sup = Supervisor(backoff=lambda: Backoff(base=0.01, cap=0.05, loop_after=3))
    child = await sup.add("crasher", _starter("raise SystemExit(3)", starts))
    try:
        await _until(lambda: len(starts) >= 5, 20)
        assert any(
            r.levelno == logging.ERROR and "crash-looping" in r.getMessage() for r in caplog.records
        )
        assert "exited with status 3" in child.last_error
    finally:
        await sup.close()
    assert child.state == "stopped"


async def test_stop_escalates_to_kill_and_runs_cleanup() -> None:
    starts: list[int] = []
    cleaned: list[str] = []

    async def cleanup() -> None:
        cleaned.append("done")

    sup = Supervisor(stop_timeout=0.5)
    child = await sup.add("stubborn", _starter(STUBBORN, starts), cleanup=cleanup)
    assert child.proc is not None and child.proc.stdout is not None
    async with asyncio.timeout(10):
        assert await child.proc.stdout.readline() == b"ready\n"  # SIGTERM is ignored by now
    proc = child.proc
    await sup.remove("stubborn")
    assert proc.returncode == -signal.SIGKILL
    assert cleaned == ["done"]
    assert "stubborn" not in sup.children
    # No respawn after a deliberate stop.
    await asyncio.sleep(0.3)
    assert starts == [proc.pid]


async def test_failed_first_start_registers_nothing() -> None:
    async def start() -> asyncio.subprocess.Process:
        raise ProcessError("cannot start /nope")

    sup = Supervisor()
    with pytest.raises(ProcessError):
        await sup.add("broken", start)
    assert sup.children == {}


DRAINER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7))\n"
    "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
    "while True: time.sleep(1)\n"
)


async def test_drain_signal_comes_first() -> None:
    sup = Supervisor(drain=Drain(signal.SIGUSR1, 5.0))
    child = await sup.add("drainer", _starter(DRAINER, []))
    assert child.proc is not None and child.proc.stdout is not None
    async with asyncio.timeout(10):
        assert await child.proc.stdout.readline() == b"ready\n"
    proc = child.proc
    await sup.close()
    assert proc.returncode == 7  # it left on the drain signal, not on SIGTERM
