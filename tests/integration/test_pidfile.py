"""service/pidfile.py: pidfiles are private, and a pid is ours only when its argv says so."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaproxy.service import pidfile


@pytest.fixture
def sleeper(short_tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated live process whose argv carries a marker we can match."""
    proc = subprocess.Popen(["/bin/sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_write_then_read(short_tmp: Path) -> None:
    path = short_tmp / "x.pid"
    pidfile.write(path, 4242)
    assert path.read_text() == "4242\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pidfile.read(path) == 4242


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("", id="empty"),
        pytest.param("abc\n", id="text"),
        pytest.param("-5\n", id="negative"),
        pytest.param("1\n", id="init"),
        pytest.param("12 13\n", id="two"),
        pytest.param("99999999999\n", id="huge"),
    ],
)
def test_garbage_is_no_pid(short_tmp: Path, content: str) -> None:
    path = short_tmp / "x.pid"
    path.write_text(content)
    assert pidfile.read(path) is None


def test_missing_is_no_pid(short_tmp: Path) -> None:
    assert pidfile.read(short_tmp / "none.pid") is None


def test_stale_pidfile_naming_unrelated_process_is_not_ours(
    short_tmp: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """A bare pid is never trusted: a live process without our arguments is not ours."""
    path = short_tmp / "x.pid"
    pidfile.write(path, sleeper.pid)
    assert pidfile.find_ours(path, ["-f", str(short_tmp / "haproxy.conf")]) is None
    assert pidfile.find_ours(path, ["/bin/sleep", "300"]) == sleeper.pid


def test_pidfile_older_than_its_process_is_not_ours(
    short_tmp: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """A reused pid, or a pidfile from before a reboot: the process is younger than the file."""
    path = short_tmp / "old.pid"
    pidfile.write(path, sleeper.pid)
    assert pidfile.find_ours(path, ["/bin/sleep", "300"]) == sleeper.pid
    started = pidfile.start_time(sleeper.pid)
    assert started is not None and abs(started - time.time()) < 120
    an_hour_before = started - 3600
    os.utime(path, (an_hour_before, an_hour_before))
    assert pidfile.find_ours(path, ["/bin/sleep", "300"]) is None


def test_dead_pid_is_not_ours(short_tmp: Path) -> None:
    proc = subprocess.Popen(["/bin/true"])
    proc.wait(timeout=30)
    assert pidfile.matches(proc.pid, ["/bin/true"]) is False


def test_own_process_matches() -> None:
    argv = pidfile.cmdline(os.getpid())
    assert argv
    assert pidfile.matches(os.getpid(), argv[:1])
    assert not pidfile.matches(os.getpid(), [])


def test_symlinked_pidfile_is_no_pid(short_tmp: Path) -> None:
    (short_tmp / "real.pid").write_text(f"{os.getpid()}\n")
    (short_tmp / "x.pid").symlink_to(short_tmp / "real.pid")
    assert pidfile.read(short_tmp / "x.pid") is None
