"""policy.screen/decide and the front's byte path must give exactly the old decide's verdicts.

`reference_decide` is `policy.decide` as it was before the per-field checks were made cheaper
(a table of field rules, a map of known name spellings, no frozen dataclass, the identity
appended as precomputed bytes), and `reference_parse_head` is `wire.parse_head` from before it
left the request line to decide. Any input, any verdict: refusal with the same status and
reason, or the same upstream request and the same bytes on the wire.
"""

from __future__ import annotations

import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.http import policy, wire
from metaproxy.http.policy import Refusal, UpstreamRequest

IDENTITY = [(b"X-Neutron-Network-ID", b"net-1")]
PEER = b"169.254.10.2"


def reference_decide(
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
    refusal = policy.check_request_line(method, target, version)
    if refusal is not None:
        return refusal
    if len(headers) > policy.MAX_FIELDS:
        return Refusal(431, "more than 64 header fields")
    kept: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    content_length = 0
    has_length = False
    client_xff = False
    expect_continue = False
    connection = b""
    for raw_name, raw_value in headers:
        if policy._FIELD_NAME.fullmatch(raw_name) is None:
            return Refusal(400, "header name outside the token grammar")
        name = raw_name.lower()
        value = raw_value.strip(b" \t")
        if name in policy._SINGLETONS:
            if name in seen:
                return Refusal(400, f"duplicate {name.decode()}")
            seen.add(name)
        canonical = policy.FORWARDED.get(name)
        if canonical is not None:
            if name == b"host" and policy._HOST.fullmatch(value) is None:
                return Refusal(400, "malformed Host")
            kept.append((canonical, value))
        elif name == b"content-length":
            if policy._DIGITS.fullmatch(value) is None:
                return Refusal(400, "malformed Content-Length")
            content_length, has_length = int(value), True
        elif name == b"transfer-encoding":
            return Refusal(400, "Transfer-Encoding is not accepted")
        elif name == b"upgrade":
            return Refusal(400, "Upgrade is not accepted")
        elif name == b"x-forwarded-for":
            client_xff = True
        elif name == b"connection":
            connection = connection + b"," + value.lower() if connection else value.lower()
        elif name == b"expect":
            expect_continue = value.lower() == b"100-continue"
    if version == b"1.1" and b"host" not in seen:
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
    kept.extend(identity)
    kept.append((b"X-Forwarded-For", peer))
    return UpstreamRequest(
        method=method,
        target=target,
        headers=kept,
        content_length=content_length,
        keep_alive=_reference_keep_alive(version, connection),
        expect_continue=expect_continue and content_length > 0,
    )


def _reference_keep_alive(version: bytes, connection: bytes) -> bool:
    tokens = {t.strip() for t in connection.split(b",")} if connection else set()
    if b"close" in tokens:
        return False
    return version == b"1.1" or b"keep-alive" in tokens


_NAMES = [
    *policy.FORWARDED,
    *policy.FORWARDED.values(),
    *policy._KNOWN_NAMES,
    b"HOST",
    b"hOsT",
    b"Content-length",
    b"CONTENT-LENGTH",
    b"Transfer-Encoding",
    b"transfer-encoding",
    b"Upgrade",
    b"X-Forwarded-For",
    b"x-forwarded-for",
    b"Connection",
    b"CONNECTION",
    b"Expect",
    b"X-Neutron-Network-ID",
    b"X_Neutron_Network_ID",
    b"X-A ",
    b"X(A",
    b"",
    b"X-Pad",
    b"Accept_Encoding",
    b"User-Agent\x00",
]
_VALUES = [
    b"",
    b" ",
    b"a",
    b"169.254.169.254",
    b" 169.254.169.254:80 ",
    b"[fe80::a9fe:a9fe]",
    b"a b",
    b"a/b",
    b"0",
    b"5",
    b"00012",
    b"+1",
    b"1, 1",
    b"99999999999999999",
    b"65536",
    b"65537",
    b"chunked",
    b"close",
    b"Close",
    b"keep-alive",
    b"Keep-Alive, close",
    b"upgrade",
    b"100-continue",
    b"100-Continue ",
    b"\tx\t",
    b"caf\xe9",
]
_FIELDS = st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=8)
_METHODS = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"get", b"CONNECT"])
_TARGETS = st.sampled_from([b"/", b"/latest/api/token", b"/a#b", b"*", b"http://a/", b"/\x7f"])
_VERSIONS = st.sampled_from([b"1.1", b"1.0", b"2.0", b"0.9"])


def _check(
    method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    expected = reference_decide(
        method, target, version, headers, identity=IDENTITY, peer=PEER, max_body=65536
    )
    got = policy.decide(
        method, target, version, list(headers), identity=IDENTITY, peer=PEER, max_body=65536
    )
    assert got == expected
    screened = policy.screen(method, target, version, list(headers), max_body=65536)
    if isinstance(expected, Refusal):
        assert screened == expected
        return
    assert isinstance(screened, UpstreamRequest)
    body = b"b" * expected.content_length
    tail = wire.identity_tail(IDENTITY, PEER)
    whole = wire.serialize_screened(screened) + tail + b"\r\n" + body
    assert whole == wire.serialize_request(expected, body)


@settings(max_examples=4000, deadline=None)
@given(_METHODS, _TARGETS, _VERSIONS, _FIELDS)
def test_decide_agrees_with_the_reference(
    method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    _check(method, target, version, headers)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12)), max_size=6))
def test_decide_agrees_with_the_reference_on_any_bytes(
    headers: list[tuple[bytes, bytes]],
) -> None:
    _check(b"GET", b"/", b"1.1", headers)


def test_more_than_sixty_four_fields_agree() -> None:
    for count in (63, 64, 65):
        _check(b"GET", b"/", b"1.1", [(b"X-A", b"b")] * count)
        _check(b"GET", b"/", b"1.1", [(b"Host", b"a")] + [(b"Host", b"b")] * count)


def reference_parse_head(head: bytes) -> wire.Head | Refusal:
    refusal = policy.check_head_bytes(head)
    if refusal is not None:
        return refusal
    line = wire._REQUEST_LINE.match(head)
    if line is None:
        return Refusal(400, "malformed request line")
    method, target, version = line.groups()
    refusal = policy.check_request_line(method, target, version)
    if refusal is not None:
        return refusal
    fields = wire._Fields()
    parser = httptools.HttpRequestParser(fields)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        return Refusal(400, f"llhttp: {exc}")
    return method, target, version, fields.headers


def _examine(raw: bytes, parse: object, decide: object) -> Refusal | UpstreamRequest:
    parsed = parse(raw)  # type: ignore[operator]
    if isinstance(parsed, Refusal):
        return parsed
    method, target, version, headers = parsed
    return decide(  # type: ignore[operator,no-any-return]
        method, target, version, headers, identity=IDENTITY, peer=PEER, max_body=65536
    )


_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"HEAD /latest/meta-data/ HTTP/1.0",
        b"PUT /latest/api/token HTTP/1.1",
        b"POST /openstack/2013-04-04/password HTTP/1.1",
        b"CONNECT a:443 HTTP/1.1",
        b"TRACE / HTTP/1.1",
        b"FOO / HTTP/1.1",
        b"get / HTTP/1.1",
        b"GET http://a/ HTTP/1.1",
        b"GET * HTTP/1.1",
        b"GET /a#b HTTP/1.1",
        b"GET / HTTP/2.0",
        b"GET / HTTP/1.2",
        b"GET /\xff HTTP/1.1",
        b"GET /\x7f HTTP/1.1",
        b"PRI * HTTP/2.0",
        b"GET  / HTTP/1.1",
        b"GET /",
    ]
)
_RAW_FIELDS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)).map(
            lambda f: f[0] + b": " + f[1]
        ),
        st.sampled_from([b"X-A : b", b"X-A", b": b", b"Connection: Upgrade", b"Upgrade: h2c"]),
    ),
    max_size=6,
)


@settings(max_examples=3000, deadline=None)
@given(_LINES, _RAW_FIELDS)
def test_parse_and_decide_agree_with_the_reference(line: bytes, fields: list[bytes]) -> None:
    raw = b"\r\n".join([line, *fields]) + b"\r\n\r\n"
    expected = _examine(raw, reference_parse_head, reference_decide)
    assert _examine(raw, wire.parse_head, policy.decide) == expected
