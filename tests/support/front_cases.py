"""Raw request heads the front must refuse, shared by the unit table and the socket tests."""

from __future__ import annotations

import pytest


def head(*lines: str, request_line: str = "GET / HTTP/1.1") -> bytes:
    return ("\r\n".join([request_line, *lines]) + "\r\n\r\n").encode("latin-1")


REFUSALS = [
    # framing and bytes
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", 400, id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400, id="bare-lf-in-fields"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400, id="bare-cr"),
    pytest.param(head("Host: a", "X-A: b", " folded"), 400, id="obs-fold-space"),
    pytest.param(head("Host: a", "X-A: b", "\tfolded"), 400, id="obs-fold-tab"),
    pytest.param(head("Host: a\x00b"), 400, id="nul-in-value"),
    pytest.param(head("Host: a", "X-A: \x01"), 400, id="control-in-value"),
    pytest.param(head("Host: a", "X-A: \x7f"), 400, id="del-in-value"),
    pytest.param(head("Host: a", "X\x00A: b"), 400, id="nul-in-name"),
    pytest.param(head("Host: a", request_line="GET /a\x00 HTTP/1.1"), 400, id="nul-in-target"),
    pytest.param(head("Host: a", request_line="GET /\x1b HTTP/1.1"), 400, id="escape-in-target"),
    pytest.param(head("Host: a", request_line="GET /\xff HTTP/1.1"), 400, id="high-in-target"),
    # request line
    pytest.param(head("Host: a", request_line="GET  / HTTP/1.1"), 400, id="double-space"),
    pytest.param(head("Host: a", request_line="GET /a b HTTP/1.1"), 400, id="space-in-target"),
    pytest.param(head("Host: a", request_line="GET /a#frag HTTP/1.1"), 400, id="fragment"),
    pytest.param(head("Host: a", request_line="GET /"), 400, id="http-0.9"),
    pytest.param(head("Host: a", request_line="GET / HTTP/2.0"), 400, id="http-2.0"),
    pytest.param(head("Host: a", request_line="GET / HTTP/1.1 "), 400, id="trailing-space"),
    pytest.param(head("Host: a", request_line="GET / http/1.1"), 400, id="lowercase-version"),
    pytest.param(head("Host: a", request_line="GET http://a/ HTTP/1.1"), 400, id="absolute-form"),
    pytest.param(head("Host: a", request_line="GET a:80 HTTP/1.1"), 400, id="authority-form"),
    pytest.param(head("Host: a", request_line="GET * HTTP/1.1"), 400, id="asterisk-form"),
    pytest.param(head("Host: a", request_line="GET latest HTTP/1.1"), 400, id="relative-target"),
    # methods
    pytest.param(head("Host: a", request_line="CONNECT a:443 HTTP/1.1"), 405, id="connect"),
    pytest.param(head("Host: a", request_line="TRACE / HTTP/1.1"), 405, id="trace"),
    pytest.param(head("Host: a", request_line="DELETE / HTTP/1.1"), 405, id="delete"),
    pytest.param(head("Host: a", request_line="PATCH / HTTP/1.1"), 405, id="patch"),
    pytest.param(head("Host: a", request_line="OPTIONS * HTTP/1.1"), 405, id="options"),
    pytest.param(head("Host: a", request_line="FOO / HTTP/1.1"), 405, id="unknown-method"),
    pytest.param(head("Host: a", request_line="get / HTTP/1.1"), 405, id="lowercase-method"),
    # field names
    pytest.param(head("Host: a", "X_Neutron_Network_ID: evil"), 400, id="underscore-name"),
    pytest.param(head("Host: a", "X-A : b"), 400, id="space-before-colon"),
    pytest.param(head("Host: a", "X(A: b"), 400, id="separator-in-name"),
    pytest.param(head("Host: a", ": b"), 400, id="empty-name"),
    pytest.param(head("Host: a", "X-A"), 400, id="no-colon"),
    # framing fields
    pytest.param(head("Host: a", "Host: b"), 400, id="duplicate-host"),
    pytest.param(head("Host: a", "host: a"), 400, id="duplicate-host-case"),
    pytest.param(head(), 400, id="http-1.1-without-host"),
    pytest.param(head("X-A: b"), 400, id="http-1.1-without-host-with-fields"),
    pytest.param(head("Host: a b"), 400, id="host-with-space"),
    pytest.param(head("Host: a/b"), 400, id="host-with-slash"),
    pytest.param(
        head("Host: a", "Content-Length: 1", "Content-Length: 1", request_line="POST / HTTP/1.1"),
        400,
        id="duplicate-content-length",
    ),
    pytest.param(
        head("Host: a", "Content-Length: 1, 1", request_line="POST / HTTP/1.1"),
        400,
        id="list-content-length",
    ),
    pytest.param(head("Host: a", "Content-Length: +1"), 400, id="signed-content-length"),
    pytest.param(head("Host: a", "Content-Length: -1"), 400, id="negative-content-length"),
    pytest.param(head("Host: a", "Content-Length: x"), 400, id="non-numeric-content-length"),
    pytest.param(head("Host: a", "Content-Length: 0x10"), 400, id="hex-content-length"),
    pytest.param(head("Host: a", "Content-Length:"), 400, id="empty-content-length"),
    pytest.param(
        head("Host: a", "Transfer-Encoding: chunked", request_line="POST / HTTP/1.1"),
        400,
        id="transfer-encoding",
    ),
    pytest.param(head("Host: a", "Transfer-Encoding: identity"), 400, id="te-identity"),
    pytest.param(
        head(
            "Host: a",
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
            request_line="POST / HTTP/1.1",
        ),
        400,
        id="te-and-cl",
    ),
    pytest.param(head("Host: a", "Upgrade: websocket"), 400, id="upgrade"),
    pytest.param(
        head("Host: a", "Connection: Upgrade", "Upgrade: h2c"), 400, id="upgrade-connection"
    ),
    pytest.param(
        head("Host: a", "X-aws-ec2-metadata-token: a", "X-aws-ec2-metadata-token: b"),
        400,
        id="duplicate-token",
    ),
    # limits
    pytest.param(head("Host: a", "X-Pad: " + "a" * 8200), 431, id="head-over-8k"),
    pytest.param(head("Host: a", *(f"X-F{i}: v" for i in range(64))), 431, id="sixty-five-fields"),
    pytest.param(
        head("Host: a", "Content-Length: 65537", request_line="POST / HTTP/1.1"),
        413,
        id="body-over-64k",
    ),
    pytest.param(
        head("Host: a", "Content-Length: 99999999999999", request_line="PUT / HTTP/1.1"),
        413,
        id="huge-body",
    ),
    # IMDSv2
    pytest.param(
        head("Host: a", "X-Forwarded-For: 1.2.3.4", request_line="PUT /latest/api/token HTTP/1.1"),
        403,
        id="token-put-with-xff",
    ),
    pytest.param(
        head(
            "Host: a", "x-forwarded-for: 1.2.3.4", request_line="PUT /latest/api/token?x HTTP/1.1"
        ),
        403,
        id="token-put-with-xff-query",
    ),
    pytest.param(
        head(
            "Host: a", "X-Forwarded-For: 1.2.3.4", request_line="PUT //latest/api/token/ HTTP/1.1"
        ),
        403,
        id="token-put-with-xff-slashes",
    ),
    pytest.param(
        head(
            "Host: a", "X-Forwarded-For: 1.2.3.4", request_line="PUT /latest/api/%74oken HTTP/1.1"
        ),
        403,
        id="token-put-with-xff-encoded",
    ),
    pytest.param(
        head("Host: a", "X-Forwarded-For: 1.2.3.4", request_line="PUT /LATEST/api/token HTTP/1.1"),
        403,
        id="any-put-with-xff",
    ),
]
