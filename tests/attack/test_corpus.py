"""Every corpus case, as raw bytes over a real socket, through both real fronts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="module", params=fronts.engine_params())
def router_front(
    request: pytest.FixtureRequest, raw_backend: RawBackend, attack_tmp: Path
) -> Iterator[fronts.Front]:
    """The same fronts in router mode: the true identity is X-Neutron-Router-ID."""
    engine: str = request.param
    with fronts.running_front(
        engine,
        raw_backend.path,
        attack_tmp / f"router-{engine}",
        router=True,
        timeouts={"http_request": 2, "http_keep_alive": 2, "client": 5, "server": 5, "connect": 2},
    ) as running:
        yield running


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CORPUS if c.cls == "forgery"])
def test_forgery_through_router_front(
    router_front: fronts.Front, raw_backend: RawBackend, case: Case
) -> None:
    truth = Truth(router_front.identity_header, router_front.identity, "127.0.0.1")
    verdict = check_case(
        router_front.addr, raw_backend, case, truth, f"{router_front.engine} front (router)"
    )
    assert verdict.ok, f"{case.name} [{verdict.outcome}]: {verdict.problems}"


@pytest.fixture(scope="module", params=fronts.engine_params())
def v6_front(
    request: pytest.FixtureRequest, raw_backend: RawBackend, attack_tmp: Path
) -> Iterator[fronts.Front]:
    """The fronts on IPv6 loopback: X-Forwarded-For must be the v6 peer, exactly."""
    engine: str = request.param
    with fronts.running_front(
        engine,
        raw_backend.path,
        attack_tmp / f"v6-{engine}",
        host="::1",
        timeouts={"http_request": 2, "http_keep_alive": 2, "client": 5, "server": 5, "connect": 2},
    ) as running:
        yield running


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CORPUS if c.cls == "forgery"])
def test_forgery_through_ipv6_front(
    v6_front: fronts.Front, raw_backend: RawBackend, case: Case
) -> None:
    truth = Truth(v6_front.identity_header, v6_front.identity, "::1")
    verdict = check_case(v6_front.addr, raw_backend, case, truth, f"{v6_front.engine} front (IPv6)")
    assert verdict.ok, f"{case.name} [{verdict.outcome}]: {verdict.problems}"
