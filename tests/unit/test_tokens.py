"""Session tokens: bound to one instance, expiring, unforgeable, and cheap to check."""

from __future__ import annotations

import pytest

from metaproxy.errors import ClientProtocolError
from metaproxy.metadata.tokens import TokenIssuer, parse_ttl

NOW = 1_800_000_000.9  # not a whole second: a 1-second token must still last a second


def test_token_lifetime_and_binding() -> None:
    issuer = TokenIssuer(b"k" * 32)
    token = issuer.issue("vm-1", 1, NOW).encode()
    assert issuer.valid("vm-1", token, NOW + 0.99)
    assert not issuer.valid("vm-1", token, NOW + 1.0)
    assert not issuer.valid("vm-2", token, NOW)
    assert not TokenIssuer(b"x" * 32).valid("vm-1", token, NOW)
    assert issuer.issue("vm-1", 60, NOW) != issuer.issue("vm-1", 60, NOW)  # nonce


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"v1.", id="prefix-only"),
        pytest.param(b"v2.AAAA", id="other-version"),
        pytest.param(b"v1.!!!!", id="not-base64"),
        pytest.param(b"v1." + b"A" * 200, id="too-long"),
        pytest.param(b"v1." + b"A" * 64, id="wrong-mac"),
    ],
)
def test_malformed_tokens_are_invalid(token: bytes) -> None:
    assert not TokenIssuer(b"k" * 32).valid("vm-1", token, NOW)


def test_tampered_expiry_is_invalid() -> None:
    import base64

    issuer = TokenIssuer(b"k" * 32)
    token = issuer.issue("vm-1", 1, NOW)
    raw = bytearray(base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4)))
    raw[0] ^= 0xFF  # push the expiry far into the future
    forged = b"v1." + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=")
    assert not issuer.valid("vm-1", forged, NOW)


@pytest.mark.parametrize(
    ("values", "ok"),
    [
        pytest.param([b"1"], 1, id="min"),
        pytest.param([b" 21600 "], 21600, id="max-padded"),
        pytest.param([b"0060"], 60, id="leading-zeros"),
        pytest.param([], None, id="missing"),
        pytest.param([b"60", b"60"], None, id="twice"),
        pytest.param([b"1e3"], None, id="float"),
        pytest.param([b"+5"], None, id="sign"),
    ],
)
def test_parse_ttl(values: list[bytes], ok: int | None) -> None:
    if ok is None:
        with pytest.raises(ClientProtocolError) as info:
            parse_ttl(values)
        assert info.value.status_hint == 400
    else:
        assert parse_ttl(values) == ok


def test_the_key_derived_from_the_secret_is_shared_and_not_the_secret() -> None:
    secret = b"s3cr3t-Shared-Value"
    token = TokenIssuer.from_secret(secret).issue("vm-1", 60, NOW).encode()
    assert TokenIssuer.from_secret(secret).valid("vm-1", token, NOW)
    assert not TokenIssuer.from_secret(b"another-secret").valid("vm-1", token, NOW)
    assert not TokenIssuer(secret).valid("vm-1", token, NOW)  # the secret itself is not the key
