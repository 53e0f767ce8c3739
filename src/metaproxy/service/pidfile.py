"""Pidfiles, and deciding whether a pid is really ours before signalling it.

A pid alone proves nothing: after a reboot or a crash the number in a stale pidfile may name
any unrelated process. A pid is ours only when `/proc/<pid>/cmdline` holds the arguments we
started it with (for haproxy: `-f <our config path>`) *and* the process started before the
pidfile was written (a pidfile is written once its process serves): a pid reused by a process
that started later, or any process after a reboot (every one starts after the stale pidfile's
time), is refused even when its arguments happen to match. `find_ours` never returns a pid that
fails either check, and callers signal only what it returns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from metaproxy.errors import FileError
from metaproxy.security import files

log = logging.getLogger(__name__)

_MAX_PIDFILE = 64


def write(path: str | os.PathLike[str], pid: int) -> None:
    """Write `pid` to `path` atomically, 0600, never through a planted symlink."""
    files.write_private(path, f"{pid}\n")


def read(path: str | os.PathLike[str]) -> int | None:
    """The pid in `path`, or None when the file is missing or does not hold one pid."""
    try:
        data = files.read_private(path, limit=_MAX_PIDFILE)
    except FileError as exc:
        # A symlink planted at the path (ELOOP) or a directory there: it names no pid of ours.
        log.warning("ignoring pidfile %s: %s", os.fspath(path), exc)
        return None
    if data is None:
        return None
    text = data.decode("ascii", "replace").strip()
    if not text.isdigit() or not 1 < int(text) < 2**22 + 1:
        log.warning("ignoring pidfile %s: it does not hold a pid (%r)", os.fspath(path), text[:20])
        return None
    return int(text)


def cmdline(pid: int) -> list[str] | None:
    """The argv of a live process, or None when it is gone (or a zombie, whose argv is empty)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return [part.decode("utf-8", "surrogateescape") for part in raw.rstrip(b"\0").split(b"\0")]


def matches(pid: int, expected: Sequence[str]) -> bool:
    """True when process `pid` is alive and `expected` appears, in order, within its argv."""
    argv = cmdline(pid)
    if argv is None or not expected:
        return False
    n = len(expected)
    return any(argv[i : i + n] == list(expected) for i in range(len(argv) - n + 1))


# /proc/stat's btime is whole seconds: a computed start time may be up to 1 s early.
_START_SLACK = 1.0


def start_time(pid: int) -> float | None:
    """When process `pid` started (Unix time), from /proc; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # Field 22 (starttime, clock ticks since boot) counts from after the ")" ending the name,
    # which may itself hold spaces or parentheses.
    fields = stat.rpartition(")")[2].split()
    try:
        ticks = int(fields[19])
    except (IndexError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def started_before(pid: int, path: str | os.PathLike[str]) -> bool:
    """True when `pid` started no later than `path` was last written."""
    started = start_time(pid)
    try:
        written = os.stat(path).st_mtime
    except OSError:
        return False
    return started is not None and started <= written + _START_SLACK


def find_ours(path: str | os.PathLike[str], expected: Sequence[str]) -> int | None:
    """The pid from `path` if that process's argv contains `expected` and it started before the
    pidfile was written; otherwise None (logged)."""
    pid = read(path)
    if pid is None:
        return None
    if not started_before(pid, path):
        log.warning(
            "pidfile %s names pid %d, which started after the pidfile was written (a reused pid, "
            "or a pidfile from before a reboot); ignoring it",
            os.fspath(path),
            pid,
        )
        return None
    if not matches(pid, expected):
        log.warning(
            "pidfile %s names pid %d, which is not ours (no %s in its command line); ignoring it",
            os.fspath(path),
            pid,
            " ".join(expected),
        )
        return None
    return pid


def scan(expected: Sequence[str], *, exe_name: str) -> list[int]:
    """Live processes whose executable is named `exe_name` and whose argv contains `expected`.

    The fallback when a pidfile is gone: a process still serving our config must not be left
    behind silently just because its pidfile was removed.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            exe = os.readlink(entry / "exe")
        except OSError:
            continue
        if os.path.basename(exe) == exe_name and matches(pid, expected):
            found.append(pid)
    return found
