"""The attack suite's scoreboard: cases tried, cases that got through, faults survived.

Tests record into it as they run; conftest.py prints it at the end of the pytest session (and
writes it as Markdown when METAPROXY_ATTACK_TABLE names a file), so CI and scripts/attack-report
show the same table.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Row:
    tried: int = 0
    through: int = 0
    faults: int = 0
    survived: int = 0
    examples: list[str] = field(default_factory=list)


ROWS: dict[tuple[str, str], Row] = {}
NOTES: list[str] = []
_LOCK = threading.Lock()


def note(text: str) -> None:
    """A measured figure worth printing under the table (latencies, memory)."""
    with _LOCK:
        NOTES.append(text)


def record(
    cls: str, target: str, *, tried: int = 1, through: int = 0, example: str | None = None
) -> None:
    """Count hostile cases of class `cls` sent at `target`; `through` of them got through."""
    with _LOCK:
        row = ROWS.setdefault((cls, target), Row())
        row.tried += tried
        row.through += through
        if example and len(row.examples) < 12:
            row.examples.append(example)


def fault(cls: str, target: str, *, survived: bool, example: str | None = None) -> None:
    """Count one injected fault; `survived` when the system behaved as the contract says."""
    with _LOCK:
        row = ROWS.setdefault((cls, target), Row())
        row.faults += 1
        row.survived += int(survived)
        if not survived and example and len(row.examples) < 12:
            row.examples.append(example)


def markdown() -> str:
    """The table, as the README shows it."""
    lines = [
        "| class | against | cases tried | got through | faults survived |",
        "|---|---|---:|---:|---:|",
    ]
    totals = Row()
    for (cls, target), row in sorted(ROWS.items()):
        faults = f"{row.survived}/{row.faults}" if row.faults else "-"
        tried = str(row.tried) if row.tried or not row.faults else "-"
        through = str(row.through) if row.tried or not row.faults else "-"
        lines.append(f"| {cls} | {target} | {tried} | {through} | {faults} |")
        totals.tried += row.tried
        totals.through += row.through
        totals.faults += row.faults
        totals.survived += row.survived
    lines.append(
        f"| **total** | | **{totals.tried}** | **{totals.through}** | "
        f"**{totals.survived}/{totals.faults}** |"
    )
    return "\n".join(lines)


def failures() -> list[str]:
    return [
        f"{cls} / {target}: {ex}"
        for (cls, target), row in sorted(ROWS.items())
        for ex in row.examples
    ]
