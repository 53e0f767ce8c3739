"""Every corpus case, as raw bytes over a real socket, through both real fronts."""

from __future__ import annotations

import pytest

from attack import fronts
from attack.backend import RawBackend
from attack.corpus import CORPUS, Case
from attack.judge import Truth
from attack.runner import check_case

pytestmark = pytest.mark.slow


def test_corpus_names_are_unique() -> None:
    names = [case.name for case in CORPUS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CORPUS])
def test_hostile_bytes_through_front(
    front: fronts.Front, raw_backend: RawBackend, case: Case
) -> None:
    truth = Truth(front.identity_header, front.identity, "127.0.0.1")
    verdict = check_case(front.addr, raw_backend, case, truth, f"{front.engine} front")
    assert verdict.ok, f"{case.name} [{verdict.outcome}]: {verdict.problems}"
    assert front.alive(), f"{front.engine} front died on {case.name}:\n{front.log_tail()}"
