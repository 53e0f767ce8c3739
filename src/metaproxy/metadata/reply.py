"""What a metadata handler returns: status, body, content type, extra headers (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"
BINARY = b"application/octet-stream"

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: bytes = TEXT
    headers: tuple[tuple[bytes, bytes], ...] = ()
    # A JSON object that gets a fresh `random_seed` appended each time it is served (so the
    # rest of it can be rendered once and cached): see openstack.seeded().
    seeded: bool = False


def head(answer: Reply, length: int, *, close: bool = False) -> bytes:
    """The HTTP/1.1 head for `answer` with a body of `length` bytes, blank line included."""
    lines = [
        b"HTTP/1.1 %d %s" % (answer.status, REASONS.get(answer.status, "").encode()),
        b"Content-Type: " + answer.content_type,
        b"Content-Length: %d" % length,
        *(name + b": " + value for name, value in answer.headers),
    ]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def ok(body: bytes | str, content_type: bytes = TEXT) -> Reply:
    return Reply(200, body.encode() if isinstance(body, str) else body, content_type)


def listing(names: Iterable[str]) -> Reply:
    """A directory listing: one name per line, no trailing newline (as Nova and AWS print)."""
    return Reply(200, "\n".join(names).encode(), TEXT)


def error(status: int) -> Reply:
    """Short, generic bodies: the detail goes to the operator's log, not to the guest."""
    return Reply(status, f"{status} {REASONS.get(status, 'Error')}\n".encode(), TEXT)


NOT_FOUND = error(404)


def not_allowed(allowed: str) -> Reply:
    return Reply(405, error(405).body, TEXT, ((b"allow", allowed.encode()),))
