"""HTTP/1.1 bytes on the wire: request heads in (httptools/llhttp under our policy), responses out.

llhttp is strict by default but still tolerates some things (HTTP/0.9 request lines, doubled
spaces, '#' in targets, underscores in names), so every raw head first passes
`policy.check_head_bytes` and our own request-line grammar, and then llhttp splits the fields.
Pure: no I/O, no logging.
"""

from __future__ import annotations

import re
from http import HTTPStatus

import httptools

from metaproxy.http import policy, sequence
from metaproxy.http.policy import Refusal

HEAD_END = b"\r\n\r\n"
# RFC 9112 §3: method SP request-target SP HTTP-version; exactly one space each.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^ ]+) HTTP/([0-9]\.[0-9])\r\n")

_VISIBLE = re.compile(rb"[\x21-\x5b\x5d-\x7e]*")

Head = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]


class _Fields:
    """httptools callback target: collects header fields of one head."""

    __slots__ = ("headers",)

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def parse_head(head: bytes) -> Head | Refusal:
    """Split a raw head (request line through the blank line) or say why it is refused.

    Returns (method, target, version, headers) with raw field names and values. The request
    line is only split here: `policy.decide` (or `screen`) judges it, before the fields.
    """
    refusal = policy.check_head_bytes(head)
    if refusal is not None:
        return refusal
    line = _REQUEST_LINE.match(head)
    if line is None:
        return Refusal(400, "malformed request line")
    method, target, version = line.groups()
    fields = _Fields()
    parser = httptools.HttpRequestParser(fields)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        # llhttp stops at CONNECT or Connection: upgrade; the fields are complete by then and
        # the policy refuses what caused it.
        pass
    except httptools.HttpParserError as exc:
        # The request line's own refusal ranks first (CONNECT host:443 is a 405, not llhttp's
        # 400). When llhttp accepts the head, `policy.screen`/`decide` check the request line:
        # once per request, not twice.
        return policy.check_request_line(method, target, version) or Refusal(400, f"llhttp: {exc}")
    return method, target, version, fields.headers


def peek_request_line(head: bytes | bytearray) -> tuple[bytes, bytes]:
    """Method and target of a refused head, for the access log only (never trusted)."""
    line = _REQUEST_LINE.match(head)
    return (line.group(1), line.group(2)) if line is not None else (b"-", b"-")


def printable(data: bytes) -> str:
    """Visible ASCII as is, every other byte as \\xNN: safe for a one-line log."""
    if _VISIBLE.fullmatch(data) is not None:
        return data.decode("ascii")
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x5C else f"\\x{b:02x}" for b in data)


def serialize_request(request: policy.UpstreamRequest, body: bytes = b"") -> bytes:
    """The agent-bound request: HTTP/1.1, kept alive, headers exactly as the policy built them."""
    parts = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
    for name, value in request.headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    if body:
        parts.append(body)
    return b"".join(parts)


def identity_tail(identity: list[tuple[bytes, bytes]], peer: bytes) -> bytes:
    """The fields `policy.decide` appends to every request (identity, X-Forwarded-For),
    serialized: computed once per client connection."""
    fields = [*identity, (b"X-Forwarded-For", peer)]
    return b"".join(name + b": " + value + b"\r\n" for name, value in fields)


def serialize_screened(request: policy.UpstreamRequest) -> bytes:
    """For a `policy.screen` result: the request line and the client fields it kept.

    The request `decide` would build is this, then `identity_tail`, then the blank line and the
    body: the same bytes as `serialize_request`. (The agent client puts its sequence field
    before the blank line.)
    """
    parts = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
    for name, value in request.headers:
        parts += (name, b": ", value, b"\r\n")
    return b"".join(parts)


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b"Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


_STATUS_LINES = {s.value: _status_line(s.value) for s in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else _status_line(status)


def _error(status: int, close: bool) -> bytes:
    body = HTTPStatus(status).phrase.encode() + b"\n"
    head = [
        status_line(status),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Cache-Control: no-store\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if status == 405:
        head.append(b"Allow: GET, HEAD, POST, PUT\r\n")
    if close:
        head.append(b"Connection: close\r\n")
    return b"".join(head) + b"\r\n" + body


_ERRORS = {
    (s, close): _error(s, close)
    for s in (400, 403, 404, 405, 408, 413, 429, 431, 500, 502, 503, 504)
    for close in (False, True)
}


def error_response(status: int, *, close: bool = True, head_only: bool = False) -> bytes:
    """A short generic answer: the phrase only; details go to the operator's log."""
    data = _ERRORS.get((status, close)) or _error(status, close)
    if head_only:
        return data[: data.index(HEAD_END) + 4]
    return data


# Response fields the front sets itself or that are hop-by-hop (RFC 9110 §7.6.1), and the
# agent's echo of the request's sequence number (`http.sequence`).
_HOP_BY_HOP = frozenset(
    {
        sequence.NAME,
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
    }
)


def serialize_response(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    close: bool,
    head_length: bytes | None = None,
) -> bytes:
    """The instance-bound response; framing is always our own Content-Length.

    For HEAD, pass `head_length` (upstream's Content-Length, or None) and an empty body.
    """
    parts = [status_line(status)]
    for name, value in headers:
        if name.lower() not in _HOP_BY_HOP:
            parts += (name, b": ", value, b"\r\n")
    if head_length is not None:
        parts += (b"Content-Length: ", head_length, b"\r\n")
    elif status >= 200 and status not in (204, 304):
        parts.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)
