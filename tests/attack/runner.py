"""Send one corpus case through a front to the raw backend, and judge what happened."""

from __future__ import annotations

import time

from attack import tally
from attack.backend import RawBackend
from attack.client import exchange
from attack.corpus import Case
from attack.judge import Truth, Verdict, judge

SETTLE = 0.015  # let a desynchronised extra request reach the backend before judging


def run_case(
    addr: tuple[str, int], backend: RawBackend, case: Case, truth: Truth, *, timeout: float = 4.0
) -> Verdict:
    backend.reset()
    ex = exchange(
        addr,
        case.raw,
        expect=case.responses,
        timeout=1.0 if case.incomplete else timeout,
        head_only=case.head,
    )
    time.sleep(SETTLE)
    backend.settle()
    ups, leftovers = backend.snapshot()
    return judge(case, ex, ups, leftovers, truth)


def check_case(
    addr: tuple[str, int], backend: RawBackend, case: Case, truth: Truth, target: str
) -> Verdict:
    """Run, tally and return the verdict (the caller asserts)."""
    verdict = run_case(addr, backend, case, truth)
    tally.record(
        case.cls,
        target,
        through=int(not verdict.ok),
        example=None if verdict.ok else f"{case.name}: {'; '.join(verdict.problems)}",
    )
    return verdict
