"""Forged identity headers after padding of every length from 3,800 to 9,000 bytes, both fronts."""

from __future__ import annotations

import os

import pytest

from attack import fronts, tally
from attack.backend import RawBackend
from attack.judge import Truth
from attack.padding import padded_request, sweep

pytestmark = pytest.mark.slow

FIRST, LAST = 3800, 9000
# Step 1 in CI (every offset); METAPROXY_ATTACK_PAD_STEP trades density for time locally.
STEP = int(os.environ.get("METAPROXY_ATTACK_PAD_STEP", "1"))


@pytest.mark.parametrize("offset", [3800, 4096, 8192, 9000])
def test_padded_request_puts_the_forgery_at_the_offset(offset: int) -> None:
    raw = padded_request(offset)
    assert raw[offset:].split(b":")[0].decode().lower().startswith(("x-", "forwarded"))
    assert raw.endswith(b"\r\n\r\n")


def test_padding_sweep(front: fronts.Front, raw_backend: RawBackend) -> None:
    truth = Truth(front.identity_header, front.identity, "127.0.0.1")
    result = sweep(front.addr, raw_backend, range(FIRST, LAST + 1, STEP), truth)
    tally.record(
        "forgery after padding 3.8-9 KB",
        f"{front.engine} front",
        tried=result.tried,
        through=len(result.failures),
        example=result.failures[0] if result.failures else None,
    )
    assert not result.failures, result.failures[:10]
    # A front that refused everything would pass vacuously: most offsets must be served.
    # The contract caps a head at 8 KiB (431 beyond), and the rotated forged block adds ~550
    # bytes after the offset, so offsets up to ~7,600 must be served.
    assert result.forwarded >= (4096 - 600) // STEP, (result.forwarded, result.refused)
    assert front.alive(), front.log_tail()
