"""Profile a running front with py-spy while wrk loads it: where the builtin front's time goes."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench import flame, fronts, wrk
from bench.report import Column, Table

PY_SPY = Path(sys.executable).parent / "py-spy"


def available() -> bool:
    return PY_SPY.exists()


def profile(front: fronts.Front, path: str, seconds: float, script: Path, out: Path) -> list[Table]:
    """py-spy `record` on the front's process during a wrk run at 32 connections."""
    assert front.child is not None
    spy = subprocess.Popen(
        [
            str(PY_SPY),
            "record",
            "--pid",
            str(front.child.pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        result = wrk.run(front.url(path), connections=32, seconds=seconds, script=script)
    finally:
        spy.wait(seconds + 30)
    text = out.read_text() if out.exists() else ""
    total, _, inclusive = flame.summarise(text)
    title = (
        f"py-spy profile of {front.label}, 32 connections, {result.rps:,.0f} req/s while "
        f"profiled ({total} samples)"
    )
    own = Table(f"{title}: source lines by own samples", [Column("line"), Column("%", ".1f")])
    for line, n in own_lines(text).most_common(15):
        own.add(line, 100 * n / max(total, 1))
    own.notes.append(
        "own: samples whose innermost Python frame is that line; time in a C call (such as "
        f"transport.write() and its syscall) counts for the line that made it; raw: {out}"
    )
    incl = Table(
        f"{title}: functions by inclusive samples", [Column("function"), Column("%", ".1f")]
    )
    # The start-up chain (main, run, Runner.run...) is in every stack: leave it out.
    root = max(inclusive.values(), default=0)
    for func, n in [(k, v) for k, v in inclusive.most_common(60) if v < root * 0.98][:15]:
        incl.add(func, 100 * n / max(total, 1))
    return [own, incl]


def own_lines(text: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            frame = stack.split(";")[-1]
            name, _, where = frame.partition(" (")
            counts[f"{name} ({where.rstrip(')').split('/src/')[-1].split('/lib/')[-1]})"] += int(n)
    return counts
