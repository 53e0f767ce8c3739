"""The shared HMAC signature: known vectors and refusals."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from metaproxy.config import Secret
from metaproxy.security.signing import sign_instance_id, verify_instance_id

SECRET = Secret("s3cret")
INSTANCE = "6e6b1a54-3a3f-4d8d-8a39-4b0c0b3e2f11"


def test_signature_is_hex_hmac_sha256() -> None:
    expected = hmac.new(b"s3cret", INSTANCE.encode(), hashlib.sha256).hexdigest()
    assert sign_instance_id(SECRET, INSTANCE) == expected


@pytest.mark.parametrize(
    ("signature", "ok"),
    [
        pytest.param(sign_instance_id(SECRET, INSTANCE), True, id="right"),
        pytest.param(sign_instance_id(Secret("other"), INSTANCE), False, id="other-secret"),
        pytest.param(sign_instance_id(SECRET, "other-instance"), False, id="other-instance"),
        pytest.param("", False, id="empty"),
        pytest.param(sign_instance_id(SECRET, INSTANCE).upper(), False, id="upper-case"),
        pytest.param("ü" * 64, False, id="non-ascii"),
    ],
)
def test_verify(signature: str, ok: bool) -> None:
    assert verify_instance_id(SECRET, INSTANCE, signature) is ok
