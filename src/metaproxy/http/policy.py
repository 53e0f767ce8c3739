"""What a front accepts from a guest, and the upstream request it builds (pure, table-tested).

The request is rebuilt, never relayed: method, origin-form target, a short allow-list of client
headers, then the identity only the front knows and `X-Forwarded-For: <peer>`. Everything a
guest could use to smuggle, confuse or impersonate is refused with a status (ARCHITECTURE.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 8 * 1024
MAX_FIELDS = 64
ALLOWED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT"})

# Client headers that go upstream, with the spelling we send. Allow-list, not deny-list: a guest
# can invent any header name (Neutron LP #1865036, underscore variants, a padded request that
# pushes the real headers out of a 4 KiB read), so only these few ever reach the agent.
FORWARDED: dict[bytes, bytes] = {
    b"host": b"Host",
    b"accept": b"Accept",
    b"content-type": b"Content-Type",
    b"user-agent": b"User-Agent",
    b"x-aws-ec2-metadata-token": b"X-aws-ec2-metadata-token",
    b"x-aws-ec2-metadata-token-ttl-seconds": b"X-aws-ec2-metadata-token-ttl-seconds",
}
# Fields whose second copy makes the request ambiguous (RFC 9110 §5.3: only list-valued fields
# may repeat; a second Host or token is a request-smuggling or confusion vector).
_SINGLETONS = frozenset(
    {
        b"host",
        b"content-length",
        b"content-type",
        b"user-agent",
        b"x-aws-ec2-metadata-token",
        b"x-aws-ec2-metadata-token-ttl-seconds",
    }
)

# Bytes a head may not contain: controls other than HTAB/CR/LF, DEL, a CR not followed by LF,
# an LF not preceded by CR (RFC 9112 §2.2 allows servers to refuse both) and obs-fold, a line
# starting with SP/HTAB (RFC 9112 §5.2: reject or replace; we reject).
_BAD_HEAD_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n|\n[ \t]")
# The same rule as a whole-head grammar: lines of allowed bytes (HTAB, SP, visible, obs-text;
# no CR, LF, other controls or DEL) joined by CRLF, and no line after the first that starts with
# SP or HTAB. A CR or LF can only appear as part of a CRLF, so bare ones never match.
_LINE = rb"[^\x00-\x08\x0a-\x1f\x7f]*"
_CLEAN_HEAD = re.compile(_LINE + rb"(?:\r\n(?:[^\x00-\x20\x7f]" + _LINE + rb")?)*")
# RFC 9110 §5.6.2 token, minus '_': Neutron LP #1865036 spoofed identity headers with underscores
# that some servers fold into dashes.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+")
# origin-form (RFC 9112 §3.2.1): '/' then visible ASCII; no fragment, no space, no controls.
_ORIGIN_FORM = re.compile(rb"/[\x21-\x22\x24-\x7e]*")
_HOST = re.compile(rb"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
_DIGITS = re.compile(rb"[0-9]{1,15}")


@dataclass(frozen=True, slots=True)
class Refusal:
    """The front answers this status itself; `reason` is for the operator's log only."""

    status: int
    reason: str


@dataclass(slots=True)
class UpstreamRequest:
    """The request the agent receives, and how the client connection continues.

    Not frozen: a frozen dataclass pays object.__setattr__ per field, once per request.
    """

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    content_length: int
    keep_alive: bool
    expect_continue: bool = False


def check_head_bytes(head: bytes) -> Refusal | None:
    """Refuse a raw head (request line to blank line) with bytes llhttp might tolerate."""
    if len(head) > MAX_HEAD:
        return Refusal(431, "request head over 8 KiB")
    # The same verdict as `_BAD_HEAD_BYTES.search(head) is None` in one linear pass: that
    # regex's lookarounds ran at every byte (5 us a request); counting passes took 1 us for a
    # usual head and 24 us for a 4 KiB padded one; this grammar takes 0.4 and 8.
    if _CLEAN_HEAD.fullmatch(head) is None:
        return Refusal(400, "bare CR/LF, control byte or obs-fold in head")
    return None


def has_bad_bytes(partial: bytes | bytearray, start: int = 0) -> bool:
    """True when an incomplete head already contains a refused byte sequence (from `start`).

    A CR as the very last byte may still be followed by its LF, so it does not count yet.
    """
    match = _BAD_HEAD_BYTES.search(partial, start)
    return match is not None and not (match.start() == len(partial) - 1 and partial[-1] == 13)


def check_request_line(method: bytes, target: bytes, version: bytes) -> Refusal | None:
    """Method before target: CONNECT host:443 is a 405, GET host:443 a 400."""
    if method not in ALLOWED_METHODS:
        return Refusal(405, "method not allowed")
    if version not in (b"1.1", b"1.0"):
        return Refusal(400, "unsupported HTTP version")
    if _ORIGIN_FORM.fullmatch(target) is None:
        return Refusal(400, "target is not origin-form")
    return None


def decide(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    identity: list[tuple[bytes, bytes]],
    peer: bytes,
    max_body: int,
) -> Refusal | UpstreamRequest:
    """Refuse the request, or build exactly what goes to the agent."""
    screened = screen(method, target, version, headers, max_body=max_body)
    if isinstance(screened, UpstreamRequest):
        screened.headers.extend(identity)
        screened.headers.append((b"X-Forwarded-For", peer))
    return screened


# What a client field does, by lower-case name: (singleton, action, spelling sent upstream).
# A name not listed is dropped (after the grammar check every field gets).
_FORWARD, _LENGTH, _CHUNKED, _UPGRADE, _XFF, _CONNECTION, _EXPECT, _NOTHING = range(8)
_RULES: dict[bytes, tuple[bool, int, bytes]] = {
    **{name: (name in _SINGLETONS, _FORWARD, sent) for name, sent in FORWARDED.items()},
    b"content-length": (True, _LENGTH, b""),
    b"transfer-encoding": (False, _CHUNKED, b""),
    b"upgrade": (False, _UPGRADE, b""),
    b"x-forwarded-for": (False, _XFF, b""),
    b"connection": (False, _CONNECTION, b""),
    b"expect": (False, _EXPECT, b""),
}
_RULES.update({name: (True, _NOTHING, b"") for name in _SINGLETONS if name not in _RULES})
# Field names as clients usually spell them, already lower-cased: saves the grammar regex and
# lower() per field. Only names the grammar accepts are listed, so the verdict is the same.
_KNOWN_NAMES: dict[bytes, bytes] = {
    spelling: spelling.lower()
    for name in [
        *FORWARDED,
        *_RULES,
        b"accept-encoding",
        b"accept-language",
        b"cache-control",
        b"pragma",
        b"referer",
        b"cookie",
        b"origin",
        b"if-none-match",
        b"if-modified-since",
        b"metadata-flavor",
        b"x-request-id",
    ]
    for spelling in (
        name,
        b"-".join(part.capitalize() for part in name.split(b"-")),
        FORWARDED.get(name, name),
    )
    if _FIELD_NAME.fullmatch(spelling) is not None
}


def screen(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    max_body: int,
) -> Refusal | UpstreamRequest:
    """`decide` without the identity and `X-Forwarded-For` fields it appends last.

    Every refusal is decided here; the front appends its precomputed identity bytes itself
    (`wire.serialize_screened`), which gives the same bytes as serializing `decide`'s result.
    """
    refusal = check_request_line(method, target, version)
    if refusal is not None:
        return refusal
    if len(headers) > MAX_FIELDS:
        return Refusal(431, "more than 64 header fields")
    kept: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    content_length = 0
    has_length = False
    client_xff = False
    expect_continue = False
    connection = b""
    for raw_name, raw_value in headers:
        name = _KNOWN_NAMES.get(raw_name)
        if name is None:
            if _FIELD_NAME.fullmatch(raw_name) is None:
                return Refusal(400, "header name outside the token grammar")
            name = raw_name.lower()
        rule = _RULES.get(name)
        if rule is None:
            continue
        singleton, action, sent = rule
        value = raw_value.strip(b" \t")
        if singleton:
            if name in seen:
                return Refusal(400, f"duplicate {name.decode()}")
            seen.add(name)
        if action == _FORWARD:
            if name == b"host" and _HOST.fullmatch(value) is None:
                return Refusal(400, "malformed Host")
            kept.append((sent, value))
        elif action == _LENGTH:
            if _DIGITS.fullmatch(value) is None:
                return Refusal(400, "malformed Content-Length")
            content_length, has_length = int(value), True
        elif action == _CHUNKED:
            return Refusal(400, "Transfer-Encoding is not accepted")
        elif action == _UPGRADE:
            return Refusal(400, "Upgrade is not accepted")
        elif action == _XFF:
            client_xff = True
        elif action == _CONNECTION:
            connection = connection + b"," + value.lower() if connection else value.lower()
        elif action == _EXPECT:
            expect_continue = value.lower() == b"100-continue"
    if version == b"1.1" and b"host" not in seen:
        # RFC 9112 §3.2: a server must answer 400 to an HTTP/1.1 request without Host.
        return Refusal(400, "HTTP/1.1 request without Host")
    if content_length > max_body:
        return Refusal(413, "body over the limit")
    if client_xff and method == b"PUT":
        # IMDSv2's rule: a token request relayed by a proxy inside the guest gets no token.
        # Every PUT, like the haproxy engine: a metadata server may route other spellings
        # (/LATEST//api/%74oken/) to the token, and PUT serves nothing else.
        return Refusal(403, "token request carries X-Forwarded-For")
    if has_length:
        kept.append((b"Content-Length", b"%d" % content_length))
    return UpstreamRequest(
        method,
        target,
        kept,
        content_length,
        _keep_alive(version, connection) if connection else version == b"1.1",
        expect_continue and content_length > 0,
    )


def _keep_alive(version: bytes, connection: bytes) -> bool:
    """RFC 9112 §9.3: 1.1 persists unless `close`; 1.0 only with `keep-alive`."""
    tokens = {t.strip() for t in connection.split(b",")} if connection else set()
    if b"close" in tokens:
        return False
    return version == b"1.1" or b"keep-alive" in tokens
