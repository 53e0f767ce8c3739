"""The upstream request's bytes and the status mapping (pure parts of agent/upstream.py)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from metaproxy.agent.upstream import map_status, serialize_request, upstream_headers
from metaproxy.config import Secret
from metaproxy.errors import ClientProtocolError
from metaproxy.metadata.records import PortMatch

MATCH = PortMatch("port-1", "net-1", "inst-1", "proj-1")


def test_serialized_request_is_exact() -> None:
    headers = upstream_headers(
        [("accept", "*/*"), ("Cookie", "c"), ("ACCEPT", "second")],
        MATCH,
        "169.254.10.2",
        Secret("k"),
    )
    data = serialize_request("PUT", "/latest/api/token", b"127.0.0.1:8775", headers, b"")
    lines = data.split(b"\r\n")
    assert lines[:3] == [b"PUT /latest/api/token HTTP/1.1", b"Host: 127.0.0.1:8775", b"Accept: */*"]
    signature = hmac.new(b"k", b"inst-1", hashlib.sha256).hexdigest().encode()
    assert lines[3:7] == [
        b"X-Forwarded-For: 169.254.10.2",
        b"X-Instance-ID: inst-1",
        b"X-Tenant-ID: proj-1",
        b"X-Instance-ID-Signature: " + signature,
    ]
    assert lines[7:] == [b"Content-Length: 0", b"", b""]


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\x00b", "a\x7fb"])
def test_control_characters_are_refused(value: str) -> None:
    headers = upstream_headers([("X-aws-ec2-metadata-token", value)], MATCH, "x", Secret("k"))
    with pytest.raises(ClientProtocolError):
        serialize_request("GET", "/", b"h", headers, b"")


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, 200), (401, 401), (403, 403), (404, 404), (204, 502), (301, 502), (429, 502)],
)
def test_map_status(status: int, expected: int) -> None:
    assert map_status(status) == expected


def test_header_values_are_relayed_byte_for_byte() -> None:
    # The protocol layer decodes raw bytes as latin-1; serialising must give the same bytes.
    token = b"t\xe9\xff".decode("latin-1")
    headers = upstream_headers([("X-aws-ec2-metadata-token", token)], MATCH, "x", Secret("k"))
    data = serialize_request("GET", "/", b"h", headers, b"")
    assert b"\r\nX-aws-ec2-metadata-token: t\xe9\xff\r\n" in data
