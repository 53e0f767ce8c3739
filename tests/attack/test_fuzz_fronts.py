"""Hypothesis-generated hostile requests through each REAL front, judged by the same rule.

Fewer examples than the in-memory policy fuzzing (each one is a real connection); the head is
always terminated so most examples are judged on a complete request rather than on a timeout.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from attack import fronts, tally
from attack.backend import RawBackend
from attack.corpus import Case
from attack.judge import Truth
from attack.runner import run_case
from attack.strategies import mutated, requests

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("METAPROXY_ATTACK_FRONT_EXAMPLES", "120"))


@pytest.mark.parametrize("strategy", [requests(), mutated()], ids=["assembled", "mutated"])
def test_fuzz_through_front(front: fronts.Front, raw_backend: RawBackend, strategy: object) -> None:
    truth = Truth(front.identity_header, front.identity, "127.0.0.1")
    tried = [0]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(strategy)
    def prop(raw: bytes) -> None:
        raw += b"\r\n\r\n"
        # Every request-line-looking run could be a request the client really sent.
        sent = max(1, raw.count(b" HTTP/1."))
        head = raw.lstrip(b"\r\n ").startswith(b"HEAD ")
        case = Case("fuzz", "fuzz", raw, forwards=sent, incomplete=True, head=head)
        verdict = run_case(front.addr, raw_backend, case, truth, timeout=1.0)
        tried[0] += 1
        assert verdict.ok, (raw[:300], verdict.outcome, verdict.problems)

    label = f"{front.engine} front"
    try:
        prop()
    except AssertionError as exc:
        tally.record("fuzz: live front", label, tried=tried[0], through=1, example=str(exc)[:300])
        raise
    tally.record("fuzz: live front", label, tried=tried[0])
    assert front.alive(), front.log_tail()
