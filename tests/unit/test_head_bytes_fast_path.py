"""check_head_bytes' fast path must refuse exactly what the reference regex refuses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.http import policy

# Bytes that matter to the rule, plus ordinary ones, so that short strings hit every branch.
_ALPHABET = st.sampled_from(
    [b"\r", b"\n", b" ", b"\t", b"\x00", b"\x0b", b"\x1f", b"\x7f", b"a", b":"]
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_ALPHABET, max_size=24).map(b"".join))
def test_fast_path_agrees_with_the_regex(head: bytes) -> None:
    reference = policy._BAD_HEAD_BYTES.search(head) is None
    assert (policy.check_head_bytes(head) is None) is reference


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", id="clean"),
        pytest.param(b"GET / HTTP/1.1\nHost: a\r\n\r\n", id="bare-lf"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", id="bare-cr"),
        pytest.param(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", id="obs-fold"),
        pytest.param(b"GET / HTTP/1.1\r\nX: a\x00\r\n\r\n", id="nul"),
        pytest.param(b"GET / HTTP/1.1\r\nX: a\tb\r\n\r\n", id="tab-inside-value"),
    ],
)
def test_fast_path_examples(head: bytes) -> None:
    reference = policy._BAD_HEAD_BYTES.search(head) is None
    assert (policy.check_head_bytes(head) is None) is reference
