"""Result values, medians and ratios, and the table printer (plain text, Markdown, JSON)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Cell = float | int | str | None


@dataclass
class Column:
    name: str
    fmt: str = ""  # a format spec applied to numbers, e.g. ",.0f"


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Cell) -> None:
        self.rows.append(list(cells))


@dataclass
class Check:
    """One target of issue 7: measured value, the rule, and whether it was met (None: not run)."""

    target: str
    value: float | None
    rule: str
    met: bool | None
    detail: str = ""


@dataclass
class ScenarioResult:
    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def at_least(target: str, value: float | None, minimum: float, detail: str = "") -> Check:
    met = None if value is None else value >= minimum
    return Check(target, value, f">= {minimum:g}", met, detail)


def at_most(target: str, value: float | None, maximum: float, detail: str = "") -> Check:
    met = None if value is None else value <= maximum
    return Check(target, value, f"<= {maximum:g}", met, detail)


def _cell(value: Cell, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not fmt:
        return f"{value:.3g}"
    return format(value, fmt)


def _rendered(table: Table) -> list[list[str]]:
    return [
        [_cell(v, c.fmt) for v, c in zip(row, table.columns, strict=True)] for row in table.rows
    ]


def text_table(table: Table) -> str:
    header = [c.name for c in table.columns]
    body = _rendered(table)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [table.title, line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    out += [f"  * {n}" for n in table.notes]
    return "\n".join(out)


def markdown_table(table: Table) -> str:
    header = [c.name for c in table.columns]
    out = [f"**{table.title}**", "", "| " + " | ".join(header) + " |"]
    out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    out += ["| " + " | ".join(r) + " |" for r in _rendered(table)]
    if table.notes:
        out.append("")
        out += [f"- {n}" for n in table.notes]
    return "\n".join(out)


def checks_table(checks: Sequence[Check]) -> Table:
    table = Table(
        "Targets (issue 7)",
        [Column("target"), Column("measured", ".3g"), Column("rule"), Column("result")],
    )
    for c in checks:
        verdict = "not run" if c.met is None else ("MET" if c.met else "MISSED")
        table.add(c.target, c.value, c.rule, verdict + (f" ({c.detail})" if c.detail else ""))
    return table


def render(results: Sequence[ScenarioResult], *, markdown: bool, checks: bool = True) -> str:
    fmt = markdown_table if markdown else text_table
    parts: list[str] = []
    found: list[Check] = []
    for result in results:
        heading = f"### {result.title}" if markdown else f"== {result.title}"
        parts.append(heading)
        if result.skipped:
            parts.append(f"skipped: {result.skipped}")
        parts += [fmt(t) for t in result.tables]
        found += result.checks
    if checks and found:
        parts.append("### Targets" if markdown else "== Targets")
        parts.append(fmt(checks_table(found)))
    return "\n\n".join(parts) + "\n"


def as_json(meta: dict[str, Any], results: Sequence[ScenarioResult]) -> dict[str, Any]:
    return {"meta": meta, "scenarios": [asdict(r) for r in results]}
