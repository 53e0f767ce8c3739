"""The sequence-number rule every pipelining client applies to an answer (pure)."""

from __future__ import annotations

import pytest

from metaproxy.errors import ConfigError
from metaproxy.http import sequence


@pytest.mark.parametrize(
    ("echo", "expected", "shared", "wrong"),
    [
        pytest.param(b"7", b"7", True, None, id="its-own"),
        pytest.param(b"7", b"7", False, None, id="its-own-alone"),
        pytest.param(None, b"7", False, None, id="alone-server-does-not-echo"),
        pytest.param(None, b"7", True, "without its sequence number", id="shared-no-echo"),
        pytest.param(b"8", b"7", False, "out of order", id="another-alone"),
        pytest.param(b"8", b"7", True, "out of order", id="another-shared"),
        pytest.param(b"07", b"7", True, "out of order", id="same-value-other-bytes"),
        pytest.param(b"", b"7", True, "out of order", id="empty"),
    ],
)
def test_mismatch(echo: bytes | None, expected: bytes, shared: bool, wrong: str | None) -> None:
    reason = sequence.mismatch(echo, expected, shared=shared)
    if wrong is None:
        assert reason is None
    else:
        assert reason is not None and wrong in reason


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"0", True),
        (b"12345678901234567890", True),
        (b"123456789012345678901", False),
        (b"", False),
        (b"-1", False),
        (b"1 ", False),
        (b"\xd9\xa1", False),  # Arabic-Indic digit one, UTF-8: not ASCII digits
    ],
)
def test_valid(value: bytes, ok: bool) -> None:
    assert sequence.valid(value) is ok


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        (b"X-Metaproxy-Seq", True),
        (b"x-metaproxy-seq", True),
        (b"X-METAPROXY-SEQ", True),
        (b"X-Metaproxy-Seq2", False),
        (b"X-Metaproxy_Seq", False),
    ],
)
def test_is_field(name: bytes, ok: bool) -> None:
    assert sequence.is_field(name) is ok


def test_numbered_puts_the_field_after_the_first_line() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert sequence.numbered(answer, b"42") == (
        b"HTTP/1.1 200 OK\r\nX-Metaproxy-Seq: 42\r\nContent-Length: 2\r\n\r\nok"
    )


@pytest.mark.parametrize(
    ("depth", "ok"), [(0, False), (1, True), (8, True), (64, True), (65, False)]
)
def test_check_pipeline(depth: int, ok: bool) -> None:
    if ok:
        assert sequence.check_pipeline(depth, "--pipeline") == depth
    else:
        with pytest.raises(ConfigError, match=f"--pipeline must be between 1 and 64, not {depth}"):
            sequence.check_pipeline(depth, "--pipeline")
