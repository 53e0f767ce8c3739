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


# Every byte class boundary of the grammar (controls, HTAB, CR, LF, SP, DEL, obs-text), and
# longer strings, so that lines, folds and bare line ends combine in many ways.
_WIDE = st.sampled_from(
    [
        *(b"\r\n", b"\r", b"\n", b" ", b"\t", b"\x00", b"\x08", b"\x0b", b"\x0c", b"\x0e"),
        *(b"\x1f", b"\x20", b"\x21", b"\x7e", b"\x7f", b"\x80", b"\xff", b"a", b":"),
        b"GET / HTTP/1.1",
    ]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_WIDE, max_size=40).map(b"".join))
def test_fast_path_agrees_with_the_regex_on_every_byte_class(head: bytes) -> None:
    reference = policy._BAD_HEAD_BYTES.search(head) is None
    assert (policy.check_head_bytes(head) is None) is reference


def test_fast_path_agrees_with_the_regex_on_each_single_byte_after_a_line() -> None:
    for byte in range(256):
        for head in (bytes([byte]), b"a\r\n" + bytes([byte]) + b"b\r\n\r\n", b"x" + bytes([byte])):
            reference = policy._BAD_HEAD_BYTES.search(head) is None
            assert (policy.check_head_bytes(head) is None) is reference, head
