"""Readers for /proc: CPU time and memory (RSS, PSS) of a process and its descendants."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    """parent pid → child pids, for every process on the machine."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def tree(pids: Iterable[int]) -> list[int]:
    """The given pids and all their living descendants."""
    kids = children_map()
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime+stime of each process, plus that of its reaped children (cutime+cstime), summed."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # After "pid (comm) ": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14.
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    return cpu_seconds(tree([root]))


@dataclass(frozen=True)
class Memory:
    """Resident and proportional set size in KiB, summed over some processes."""

    rss_kib: int
    pss_kib: int
    processes: int

    def __add__(self, other: Memory) -> Memory:
        return Memory(
            self.rss_kib + other.rss_kib,
            self.pss_kib + other.pss_kib,
            self.processes + other.processes,
        )


ZERO = Memory(0, 0, 0)


def memory(pid: int) -> Memory:
    """RSS and PSS of one process from /proc/PID/smaps_rollup (zero if it is gone)."""
    values = {"Rss:": 0, "Pss:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                parts = line.split()
                if parts and parts[0] in values:
                    values[parts[0]] = int(parts[1])
    except (FileNotFoundError, ProcessLookupError):
        return ZERO
    return Memory(values["Rss:"], values["Pss:"], 1)


def tree_memory(roots: Iterable[int]) -> Memory:
    total = ZERO
    for pid in tree(roots):
        total = total + memory(pid)
    return total


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""
