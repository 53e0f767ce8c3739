"""The front's policy as a table: raw head bytes → refusal status, or the exact upstream request."""

from __future__ import annotations

import pytest

from metaproxy.http import policy, wire
from metaproxy.http.policy import Refusal, UpstreamRequest
from support.front_cases import REFUSALS, head

IDENTITY = [(b"X-Neutron-Network-ID", b"net-1")]
PEER = b"169.254.10.2"
TAIL = [(b"X-Neutron-Network-ID", b"net-1"), (b"X-Forwarded-For", PEER)]


def examine(raw: bytes) -> Refusal | UpstreamRequest:
    parsed = wire.parse_head(raw)
    if isinstance(parsed, Refusal):
        return parsed
    method, target, version, headers = parsed
    return policy.decide(
        method, target, version, headers, identity=IDENTITY, peer=PEER, max_body=65536
    )


@pytest.mark.parametrize(("raw", "status"), REFUSALS)
def test_refused(raw: bytes, status: int) -> None:
    result = examine(raw)
    assert isinstance(result, Refusal), result
    assert result.status == status


ACCEPTED = [
    pytest.param(
        head("Host: 169.254.169.254", "User-Agent: Cloud-Init/22.4.2", "Accept: */*"),
        UpstreamRequest(
            b"GET",
            b"/",
            [
                (b"Host", b"169.254.169.254"),
                (b"User-Agent", b"Cloud-Init/22.4.2"),
                (b"Accept", b"*/*"),
                *TAIL,
            ],
            0,
            True,
        ),
        id="cloud-init",
    ),
    pytest.param(
        head(
            "host: 169.254.169.254",
            "accept-encoding: gzip",
            "Connection: keep-alive",
            "X-Neutron-Network-ID: evil",
            "X-Neutron-Router-ID: evil",
            "X-OVN-Network-ID: evil",
            "X-Instance-ID: evil",
            "X-Instance-ID-Signature: evil",
            "X-Tenant-ID: evil",
            "X-Forwarded-For: 169.254.1.1",
            "Forwarded: for=169.254.1.1",
            "X-Real-IP: 169.254.1.1",
            "X-Metadata-Provider: evil",
            "Cookie: a=b",
            request_line="GET /openstack/latest/meta_data.json HTTP/1.1",
        ),
        UpstreamRequest(
            b"GET",
            b"/openstack/latest/meta_data.json",
            [(b"Host", b"169.254.169.254"), *TAIL],
            0,
            True,
        ),
        id="identity-headers-dropped",
    ),
    pytest.param(
        head(
            "Host: [fe80::a9fe:a9fe]",
            "X-aws-ec2-metadata-token-ttl-seconds: 21600",
            request_line="PUT /latest/api/token HTTP/1.1",
        ),
        UpstreamRequest(
            b"PUT",
            b"/latest/api/token",
            [
                (b"Host", b"[fe80::a9fe:a9fe]"),
                (b"X-aws-ec2-metadata-token-ttl-seconds", b"21600"),
                *TAIL,
            ],
            0,
            True,
        ),
        id="token-put",
    ),
    pytest.param(
        head(
            "Host: a:80",
            "Content-Type: application/json",
            "Content-Length: 00012",
            "Expect: 100-continue",
            request_line="POST /openstack/2013-04-04/password HTTP/1.1",
        ),
        UpstreamRequest(
            b"POST",
            b"/openstack/2013-04-04/password",
            [
                (b"Host", b"a:80"),
                (b"Content-Type", b"application/json"),
                (b"Content-Length", b"12"),
                *TAIL,
            ],
            12,
            True,
            expect_continue=True,
        ),
        id="post-with-body",
    ),
    pytest.param(
        head("X-aws-ec2-metadata-token:   tok  ", request_line="HEAD /latest/meta-data/ HTTP/1.0"),
        UpstreamRequest(
            b"HEAD",
            b"/latest/meta-data/",
            [(b"X-aws-ec2-metadata-token", b"tok"), *TAIL],
            0,
            False,
        ),
        id="http-1.0-head-no-host",
    ),
    pytest.param(
        head("Host: a", "Connection: Keep-Alive", request_line="GET /?a=b&c=%20 HTTP/1.0"),
        UpstreamRequest(b"GET", b"/?a=b&c=%20", [(b"Host", b"a"), *TAIL], 0, True),
        id="http-1.0-keep-alive",
    ),
    pytest.param(
        head("Host: a", "Connection: close"),
        UpstreamRequest(b"GET", b"/", [(b"Host", b"a"), *TAIL], 0, False),
        id="connection-close",
    ),
    pytest.param(
        head("Host: a", "X-Pad: " + "p" * 7000, "X-Forwarded-For: 1.1.1.1"),
        UpstreamRequest(b"GET", b"/", [(b"Host", b"a"), *TAIL], 0, True),
        id="padded",
    ),
    pytest.param(
        head("Host: a", *(f"X-F{i}: v" for i in range(63))),
        UpstreamRequest(b"GET", b"/", [(b"Host", b"a"), *TAIL], 0, True),
        id="sixty-four-fields",
    ),
    pytest.param(
        head("Host: a", "X-Forwarded-For: 1.2.3.4", request_line="GET /latest/api/token HTTP/1.1"),
        UpstreamRequest(b"GET", b"/latest/api/token", [(b"Host", b"a"), *TAIL], 0, True),
        id="xff-on-get-dropped",
    ),
    pytest.param(
        head("Host: a", "Content-Length: 65536", request_line="PUT /x HTTP/1.1"),
        UpstreamRequest(
            b"PUT", b"/x", [(b"Host", b"a"), (b"Content-Length", b"65536"), *TAIL], 65536, True
        ),
        id="body-at-limit",
    ),
    pytest.param(
        head("Host: a", "X-A: caf\xe9"),
        UpstreamRequest(b"GET", b"/", [(b"Host", b"a"), *TAIL], 0, True),
        id="obs-text-value-dropped",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), ACCEPTED)
def test_accepted(raw: bytes, expected: UpstreamRequest) -> None:
    assert examine(raw) == expected


def test_serialized_request_carries_one_identity() -> None:
    result = examine(head("Host: a", "X-Neutron-Network-ID: evil", request_line="GET /x HTTP/1.1"))
    assert isinstance(result, UpstreamRequest)
    data = wire.serialize_request(result)
    assert data == (
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-Neutron-Network-ID: net-1\r\n"
        b"X-Forwarded-For: 169.254.10.2\r\n\r\n"
    )


def test_error_responses_are_short_and_close() -> None:
    data = wire.error_response(405)
    assert data.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"Connection: close\r\n" in data
    assert data.endswith(b"\r\n\r\nMethod Not Allowed\n")
    assert wire.error_response(504, head_only=True).endswith(b"\r\n\r\n")


def test_response_framing_is_ours() -> None:
    data = wire.serialize_response(
        200,
        [
            (b"Content-Type", b"text/plain"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"x"),
        ],
        b"abc",
        close=False,
    )
    assert data == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc"
