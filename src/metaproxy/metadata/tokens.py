"""IMDSv2-style session tokens, stateless: an HMAC over (instance, expiry, nonce), pure.

A token is `v1.<base64url(expiry_ms ‖ nonce ‖ mac)>` with mac = HMAC-SHA256(key, instance ‖ expiry ‖
nonce). The server checks it against the instance the *agent* vouched for (X-Instance-ID, signed),
so a token taken from one instance is worthless to any other. Nothing is stored per token, so a
GET never writes. The key is derived from the shared secret (`TokenIssuer.from_secret`), so a
token outlives a restart of the server and is good at every server of the deployment, and
changing the secret revokes every token. Whoever holds the secret could already sign any
instance's identity, so the derived key gives nobody anything new.

The rule "a token PUT relayed by a proxy inside the guest is refused" (AWS checks the request for
X-Forwarded-For) belongs to the FRONT: by the time a request reaches this server the agent has
added its own X-Forwarded-For to every request, so the server cannot tell the two apart. Both
front engines refuse `PUT /latest/api/token` carrying a client X-Forwarded-For with 403.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct

from metaproxy.errors import ClientProtocolError

TOKEN_PATH = "/latest/api/token"  # noqa: S105
TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aws-ec2-metadata-token"  # noqa: S105
MIN_TTL = 1
MAX_TTL = 21600  # six hours, AWS's limit
_PREFIX = "v1."
_PACK = struct.Struct(">Q8s")
# What the token key is derived from the shared secret for (and nothing else is).
_KEY_LABEL = b"metaproxy imds session token key v1"


def parse_ttl(values: list[bytes]) -> int:
    """The requested lifetime in seconds; anything but one integer in [1, 21600] is a 400."""
    if len(values) != 1:
        raise ClientProtocolError("token PUT needs exactly one TTL header", status_hint=400)
    text = values[0].strip()
    if not text.isdigit() or len(text) > 6 or not MIN_TTL <= int(text) <= MAX_TTL:
        raise ClientProtocolError("token TTL must be 1-21600 seconds", status_hint=400)
    return int(text)


class TokenIssuer:
    """Issues and checks tokens bound to one instance; `now` is wall-clock seconds."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    @classmethod
    def from_secret(cls, secret: bytes) -> TokenIssuer:
        """The issuer every server sharing `secret` agrees on (its own key, not the secret)."""
        return cls(hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest())

    def _mac(self, instance_id: str, head: bytes) -> bytes:
        return hmac.new(self._key, instance_id.encode() + b"\0" + head, hashlib.sha256).digest()

    def issue(self, instance_id: str, ttl: int, now: float) -> str:
        # Milliseconds: a 1-second token must not expire at the next whole second.
        head = _PACK.pack(int((now + ttl) * 1000), secrets.token_bytes(8))
        raw = head + self._mac(instance_id, head)
        return _PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def valid(self, instance_id: str, token: bytes, now: float) -> bool:
        """True only for an unexpired token issued to `instance_id` by this issuer."""
        if not token.startswith(_PREFIX.encode()) or len(token) > 128:
            return False
        body = token[len(_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))
        except ValueError:
            return False
        if len(raw) != _PACK.size + 32:
            return False
        head, mac = raw[: _PACK.size], raw[_PACK.size :]
        if not hmac.compare_digest(mac, self._mac(instance_id, head)):
            return False
        expiry, _ = _PACK.unpack(head)
        return bool(now * 1000 < expiry)
