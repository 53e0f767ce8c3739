"""The suite must be able to fail: vulnerable fronts are caught, benign traffic is not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from attack.backend import RawBackend, parse_one
from attack.corpus import CORPUS
from attack.judge import Truth
from attack.naive import naive_front
from attack.padding import sweep
from attack.runner import run_case

IDENTITY = b"X-Neutron-Network-ID: attack-net-0001"
TRUTH = Truth("X-Neutron-Network-ID", "attack-net-0001", "127.0.0.1")
BY_NAME = {case.name: case for case in CORPUS}


@pytest.fixture
def backend(short_tmp: Path) -> Iterator[RawBackend]:
    with RawBackend(short_tmp / "up.sock") as b:
        yield b


@pytest.mark.parametrize(
    "name",
    [
        "forge-x-forwarded-for-exact",
        "forge-x-neutron-network-id-lower",
        "forge-x-neutron-router-id-exact",
        "forge-x-tenant-id-mixed",
        "forge-x-forwarded-for-underscore",
        "cl-te",
        "te-cl",
        "pipelined-forged-second",
        "chunk-forged-trailer",
        "obs-fold-forged",
        "target-absolute-other",
        "connect",
        "method-TRACE",
        "upgrade-websocket",
        "token-put-with-xff",
    ],
)
def test_relaying_front_is_caught(backend: RawBackend, name: str) -> None:
    with naive_front(backend.path, "relay", IDENTITY) as addr:
        verdict = run_case(addr, backend, BY_NAME[name], TRUTH)
    assert not verdict.ok, f"{name} slipped past the judge: {verdict.outcome}"


@pytest.mark.parametrize("name", ["control-get", "control-post-body", "hop-by-hop-only-host"])
def test_relaying_front_passes_benign_requests(backend: RawBackend, name: str) -> None:
    with naive_front(backend.path, "relay", IDENTITY) as addr:
        verdict = run_case(addr, backend, BY_NAME[name], TRUTH)
    assert verdict.ok, verdict.problems


def test_padding_sweep_catches_a_4k_reader(backend: RawBackend) -> None:
    with naive_front(backend.path, "first4k", IDENTITY) as addr:
        result = sweep(addr, backend, range(3800, 4300, 7), TRUTH, workers=2, reuse=False)
        clean = sweep(addr, backend, range(200, 260, 7), TRUTH, workers=2, reuse=False)
    assert len(result.failures) >= result.tried // 2, result.failures
    assert not clean.failures, clean.failures


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n X: 1\r\n\r\n", "obs-fold", id="fold"),
        pytest.param(b"GET / HTTP/1.1\r\nA: 1\nB: 2\r\n\r\n", "bare CR or LF", id="bare-lf"),
        pytest.param(b"GET /a b HTTP/1.1\r\n\r\n", "malformed request line", id="space"),
        pytest.param(
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "both Content-Length",
            id="cl-te",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\r\n\r\n",
            "trailer",
            id="trailer",
        ),
    ],
)
def test_backend_notes_framing_problems(raw: bytes, problem: str) -> None:
    up, used = parse_one(raw)
    assert any(problem in p for p in up.problems), up.problems
    assert used == len(raw)


@pytest.mark.parametrize(
    ("head", "found"),
    [
        pytest.param(b"GET /x HTTP/1.1\r\nAccept: EVIL-0000-forged", [], id="allowed-field"),
        pytest.param(b"GET /evil HTTP/1.1\r\nHost: a", [], id="target"),
        pytest.param(b"GET / HTTP/1.1\r\nX-Foo: EVIL", [b"evil"], id="unlisted-field"),
        pytest.param(b"GET / HTTP/1.1\r\nX-Neutron-Network-ID: evil", [b"evil"], id="identity"),
        pytest.param(
            b"GET / HTTP/1.1\r\nAccept: a\r\nX-Forwarded-For: 169.254.6.66",
            [b"169.254.6.66"],
            id="forged-peer",
        ),
    ],
)
def test_forged_markers_count_outside_what_is_relayed_as_sent(
    head: bytes, found: list[bytes]
) -> None:
    """The guest's own target and allow-listed fields are relayed by design: a marker there
    (a mutated request moved `EVIL` into an Accept value) is no leak; anywhere else it is."""
    from attack.judge import forged_markers

    assert forged_markers(head) == found
