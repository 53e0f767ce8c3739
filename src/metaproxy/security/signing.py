"""The instance-identity signature the agent adds and the metadata server checks (Nova's scheme)."""

from __future__ import annotations

import hashlib
import hmac

from metaproxy.config import Secret


def sign_instance_id(secret: Secret, instance_id: str) -> str:
    """hex(HMAC-SHA256(shared_secret, instance_id)), as Nova's metadata API expects."""
    return hmac.new(
        secret.reveal().encode("utf-8"), instance_id.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def verify_instance_id(secret: Secret, instance_id: str, signature: str) -> bool:
    """True when `signature` is the right one for `instance_id`, compared in constant time."""
    expected = sign_instance_id(secret, instance_id)
    # hmac.compare_digest: a byte-by-byte early exit would leak the signature's prefix by timing.
    return hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace"))
