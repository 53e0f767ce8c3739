"""The sequence number that lets a pipelining client check that each answer is its own.

Answers to pipelined HTTP/1.1 requests come back in order (RFC 9112 §9.3.2), so a client
matches them to its requests by position, and one answer out of place would hand one instance
another instance's metadata. metaproxy does not trust position alone: a client numbers each
request with `X-Metaproxy-Seq: N`, and metaproxy's own servers (the agent, the embedded
metadata server) echo the number in the answer. A client lets requests share a connection only
with a server that has echoed, and then refuses any answer whose number is not that of the
request it would be matched to. A server that does not echo (Neutron's agent, Nova) is never
sent two requests at once. The field never reaches an instance. Here too: how many requests a
builtin front may have in flight on one agent connection (`check_pipeline`). Pure: no I/O.
"""

from __future__ import annotations

from metaproxy.errors import ConfigError

FIELD = b"X-Metaproxy-Seq"
NAME = FIELD.lower()
MAX_DIGITS = 20
# A builtin front's pipelining depth (--pipeline, [front] pipeline): the default and the most.
PIPELINE = 8
MAX_PIPELINE = 64


def is_field(name: bytes) -> bool:
    """Whether the header field name `name` is the sequence field (in any case)."""
    return len(name) == 15 and name.lower() == NAME


def valid(value: bytes) -> bool:
    """A number a server may echo: ASCII digits, at most MAX_DIGITS of them."""
    return value.isdigit() and len(value) <= MAX_DIGITS


def line(seq: bytes) -> bytes:
    """The serialized field, CRLF included."""
    return b"%s: %s\r\n" % (FIELD, seq)


def numbered(message: bytes, seq: bytes) -> bytes:
    """A serialized request or answer with the field right after its first line."""
    cut = message.index(b"\r\n") + 2
    return b"%s%s%s" % (message[:cut], line(seq), message[cut:])


def mismatch(echo: bytes | None, expected: bytes, *, shared: bool) -> str | None:
    """Why an answer that echoed `echo` (None: no field) cannot answer the request numbered
    `expected`, or None when it can.

    `shared`: the connection carries more than this request, or has echoed before; then the
    answer must echo.
    """
    if echo is None:
        return "answer without its sequence number" if shared else None
    if echo != expected:
        return f"answer out of order: sequence {echo[:20]!r} for {expected.decode()}"
    return None


def check_pipeline(depth: int, name: str) -> int:
    """`depth` if it is a depth a front accepts, else a ConfigError naming the setting `name`."""
    if not 1 <= depth <= MAX_PIPELINE:
        raise ConfigError(
            f"{name} must be between 1 and {MAX_PIPELINE}, not {depth}", key=name.lstrip("-")
        )
    return depth
