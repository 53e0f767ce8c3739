"""The hostile-input corpus, as data: named raw-byte cases shared by every engine and the fuzzers.

Every forged value carries a marker (`EVIL`, or the address 169.254.6.66) so the judge can see
it anywhere in an upstream head. A case says what the contract demands of it: `refuse` (it must
never reach the upstream), `forward` (a benign control: it must), or `either` (refusing it or
forwarding it cleanly are both fine). Whatever it says, the judge's rule (judge.py) holds too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

Expect = Literal["either", "refuse", "forward"]

FORGED_IP = "169.254.6.66"
FORGED_ID = "EVIL-0000-forged"
FORGED_MARKERS = (b"evil", FORGED_IP.encode())
HOST = b"Host: 169.254.169.254"
TARGET = "/latest/meta-data/instance-id"


@dataclass(frozen=True)
class Case:
    """One hostile input: raw bytes and what the contract demands of them."""

    name: str
    cls: str
    raw: bytes
    expect: Expect = "either"
    status: int | None = None  # the refusal status the contract names, when it names one
    forwards: int = 1  # upstream requests the client really sent
    responses: int = 1  # final responses to wait for before judging
    incomplete: bool = False  # the bytes stop mid-request: silence is allowed
    head: bool = False  # a HEAD: responses carry no body


def req(
    target: str | bytes = TARGET,
    *headers: bytes,
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
    body: bytes = b"",
    host: bool = True,
    eol: bytes = b"\r\n",
) -> bytes:
    """Raw request bytes, headers given as raw lines (nothing is checked or escaped)."""
    tgt = target.encode("latin-1") if isinstance(target, str) else target
    lines = [method + b" " + tgt + b" " + version]
    if host:
        lines.append(HOST)
    lines += headers
    return eol.join(lines) + eol + eol + body


def smuggled(path: str = "/smuggled") -> bytes:
    """The request an attacker hides in a body, with a forged identity."""
    return req(
        path,
        b"X-Neutron-Network-ID: " + FORGED_ID.encode(),
        b"X-Forwarded-For: " + FORGED_IP.encode(),
    )


def cl(n: int) -> bytes:
    return b"Content-Length: " + str(n).encode()


TE = b"Transfer-Encoding: chunked"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"


def _framing() -> Iterator[Case]:
    c = "framing"
    hidden = smuggled()

    def p(*headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
        return req(
            "/openstack/latest/password", *headers, method=b"POST", body=body, version=version
        )

    yield Case("control-get", c, req(), expect="forward")
    yield Case("control-post-body", c, p(cl(5), body=b"hello"), expect="forward")
    yield Case("control-pipelined-2", c, req() + req("/latest/"), "forward", None, 2, 2)

    te_body = b"0\r\n\r\n" + hidden
    yield Case("cl-te", c, p(cl(len(te_body)), TE, body=te_body))
    yield Case("cl-te-reversed", c, p(TE, cl(len(te_body)), body=te_body))
    te_cl_body = chunk(hidden) + LAST_CHUNK
    yield Case("te-cl", c, p(TE, cl(4), body=te_cl_body))
    yield Case("te-cl-short", c, p(cl(3), TE, body=b"1\r\nZ\r\n0\r\n\r\n" + hidden))
    yield Case("cl-cl-differ", c, p(cl(5), cl(len(hidden) + 5), body=b"hello" + hidden))
    yield Case("cl-cl-same", c, p(cl(5), cl(5), body=b"hello"))
    yield Case("cl-list-same", c, p(b"Content-Length: 5, 5", body=b"hello"))
    yield Case(
        "cl-list-differ",
        c,
        p(f"Content-Length: 5, {5 + len(hidden)}".encode(), body=b"hello" + hidden),
    )
    for label, value in (
        ("empty", b""),
        ("plus", b"+5"),
        ("minus", b"-5"),
        ("hex", b"0x5"),
        ("spaced", b"5 5"),
        ("float", b"5.0"),
        ("huge", b"99999999999999999999999"),
        ("int64-wrap", b"18446744073709551621"),
        ("unicode-digit", "\uff15".encode()),
        ("trailing-junk", b"5abc"),
    ):
        yield Case(f"cl-{label}", c, p(b"Content-Length: " + value, body=b"hello" + hidden))
    yield Case("cl-leading-zeros", c, p(b"Content-Length: 005", body=b"hello"))
    yield Case("cl-over-body-limit", c, p(cl(70000), body=b"a" * 70000), expect="refuse")
    yield Case("cl-claims-more", c, p(cl(500), body=b"hello" + hidden), incomplete=True)
    for label, te in (
        ("vtab", b"Transfer-Encoding: \x0bchunked"),
        ("comma-first", b"Transfer-Encoding: ,chunked"),
        ("doubled", b"Transfer-Encoding: chunked, chunked"),
        ("identity-chunked", b"Transfer-Encoding: identity, chunked"),
        ("gzip-chunked", b"Transfer-Encoding: gzip, chunked"),
        ("chunked-gzip", b"Transfer-Encoding: chunked, gzip"),
        ("xchunked", b"Transfer-Encoding: xchunked"),
        ("tab", b"Transfer-Encoding:\tchunked"),
        ("space-before-colon", b"Transfer-Encoding : chunked"),
        ("upper", b"TRANSFER-ENCODING: CHUNKED"),
        ("quoted", b'Transfer-Encoding: "chunked"'),
        ("nul", b"Transfer-Encoding: chunked\x00"),
        ("two-lines", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity"),
        ("folded", b"Transfer-Encoding:\r\n chunked"),
        ("underscore", b"Transfer_Encoding: chunked"),
    ):
        yield Case(f"te-{label}", c, p(te, cl(len(te_body)), body=te_body))
        yield Case(f"te-{label}-alone", c, p(te, body=te_cl_body))
    yield Case("te-http10", c, p(TE, body=te_cl_body, version=b"HTTP/1.0"))
    yield Case("te-cl-http10", c, p(TE, cl(len(te_body)), body=te_body, version=b"HTTP/1.0"))
    for label, sizes in (
        ("extension", b"5;ext=1\r\nhello\r\n"),
        ("negative", b"-5\r\nhello\r\n"),
        ("huge", b"fffffffffffffffff5\r\nhello\r\n"),
        ("0x-prefix", b"0x5\r\nhello\r\n"),
        ("leading-space", b" 5\r\nhello\r\n"),
        ("bare-lf", b"5\nhello\n"),
        ("short-data", b"9\r\nhello\r\n"),
        ("long-data", b"2\r\nhello\r\n"),
        ("underscore", b"5_0\r\nhello\r\n"),
    ):
        yield Case(f"chunk-{label}", c, p(TE, body=sizes + LAST_CHUNK + hidden))
    trailer = (
        b"0\r\nX-Neutron-Network-ID: "
        + FORGED_ID.encode()
        + b"\r\nX-Forwarded-For: "
        + FORGED_IP.encode()
        + b"\r\n\r\n"
    )
    yield Case("chunk-forged-trailer", c, p(TE, body=chunk(b"hello") + trailer))
    yield Case("bare-lf-everywhere", c, req(b"X-Forwarded-For: " + FORGED_IP.encode(), eol=b"\n"))
    yield Case("bare-lf-request-line", c, b"GET / HTTP/1.1\n" + HOST + b"\r\n\r\n")
    yield Case("bare-lf-in-header", c, req(b"X-A: 1\nX-Forwarded-For: " + FORGED_IP.encode()))
    yield Case("bare-cr-in-header", c, req(b"X-A: 1\rX-Forwarded-For: " + FORGED_IP.encode()))
    yield Case(
        "bare-cr-eol",
        c,
        req(b"X-Neutron-Network-ID: " + FORGED_ID.encode(), eol=b"\r"),
        incomplete=True,
    )
    yield Case("cr-cr-lf", c, req(b"X-A: 1\r\r\nX-Forwarded-For: " + FORGED_IP.encode()))
    yield Case("lf-cr-lf", c, req(b"X-A: 1\n\r\nX-Forwarded-For: " + FORGED_IP.encode()))
    yield Case("obs-fold-forged", c, req(b"X-A: 1", b" X-Forwarded-For: " + FORGED_IP.encode()))
    yield Case("obs-fold-tab", c, req(b"X-A: 1", b"\tX-Neutron-Network-ID: " + FORGED_ID.encode()))
    yield Case("obs-fold-xff", c, req(b"X-Forwarded-For: 127.0.0.1", b" , " + FORGED_IP.encode()))
    yield Case(
        "obs-fold-first",
        c,
        b"GET / HTTP/1.1\r\n X-Forwarded-For: " + FORGED_IP.encode() + b"\r\n" + HOST + b"\r\n\r\n",
    )
    for label, line in (
        ("nul-value", b"X-A: a\x00b"),
        ("nul-name", b"X-A\x00: b"),
        ("soh-value", b"X-A: a\x01b"),
        ("esc-value", b"X-A: a\x1b[31mb"),
        ("del-name", b"X\x7fA: b"),
        ("vtab-before-colon", b"X-Forwarded-For\x0b: " + FORGED_IP.encode()),
        ("space-before-colon", b"X-Forwarded-For : " + FORGED_IP.encode()),
        ("tab-before-colon", b"X-Forwarded-For\t: " + FORGED_IP.encode()),
        ("formfeed-value", b"X-A: a\x0cb"),
        ("no-colon", b"X-Forwarded-For " + FORGED_IP.encode()),
        ("empty-name", b": " + FORGED_IP.encode()),
        ("high-byte-name", b"X-\xffA: b"),
    ):
        yield Case(f"ctl-{label}", c, req(line))
    for label, target in (
        ("fragment", b"/latest/meta-data/#frag"),
        ("raw-space", b"/latest/meta-data/ instance-id"),
        ("raw-space-version", b"/latest HTTP/1.1 X"),
        ("tab", b"/latest\tX"),
        ("nul", b"/latest\x00/x"),
        ("ctl", b"/latest\x01/x"),
        ("del", b"/latest\x7f"),
        ("backslash", b"\\latest\\meta-data"),
        ("empty", b""),
    ):
        yield Case(f"target-{label}", c, req(target))
    yield Case("double-space", c, b"GET  /latest/ HTTP/1.1\r\n" + HOST + b"\r\n\r\n")
    yield Case("leading-crlf", c, b"\r\n\r\n" + req())
    yield Case("leading-space", c, b" " + req())
    yield Case("version-1.2", c, req(version=b"HTTP/1.2"))
    yield Case("version-2.0", c, req(version=b"HTTP/2.0"))
    yield Case("version-lower", c, req(version=b"http/1.1"))
    yield Case("version-leading-zero", c, req(version=b"HTTP/01.1"))
    yield Case("version-garbage", c, req(version=b"HTTP/1.1x"))
    yield Case("pipelined-forged-second", c, req() + smuggled("/latest/"), "either", None, 2, 2)
    yield Case(
        "pipelined-after-bad",
        c,
        req(b"Content-Length: x") + smuggled("/latest/"),
        "either",
        None,
        1,
        2,
    )
    yield Case("get-with-body-request", c, req(cl(len(hidden)), body=hidden), "either", None, 1, 2)
    yield Case(
        "pipelined-cl-te-then-get",
        c,
        p(cl(len(te_body)), TE, body=te_body) + req("/latest/"),
        "either",
        None,
        2,
        2,
    )
    yield Case(
        "put-token-te-smuggle",
        c,
        req(
            "/latest/api/token",
            b"X-aws-ec2-metadata-token-ttl-seconds: 60",
            TE,
            cl(len(te_body)),
            method=b"PUT",
            body=te_body,
        ),
    )


IDENTITY_HEADERS: Sequence[tuple[str, str]] = (
    ("X-Neutron-Network-ID", FORGED_ID),
    ("X-Neutron-Router-ID", FORGED_ID),
    ("X-Forwarded-For", FORGED_IP),
    ("Forwarded", f"for={FORGED_IP}"),
    ("X-Real-IP", FORGED_IP),
    ("X-Instance-ID", FORGED_ID),
    ("X-Instance-ID-Signature", "EVIL" + "0" * 60),
    ("X-Tenant-ID", FORGED_ID),
    ("X-OVN-Network-ID", FORGED_ID),
    ("X-OVN-Metadata-Port", FORGED_ID),
    ("X-Metadata-Provider", FORGED_ID),
    ("X-Metadata-Provider-Signature", "EVIL" + "0" * 60),
)


def _mixed(name: str) -> str:
    return "".join(ch.upper() if i % 2 else ch.lower() for i, ch in enumerate(name))


def forgery_lines(name: str, value: str) -> Iterator[tuple[str, list[bytes]]]:
    """Every disguise of one identity header: (variant label, raw header lines)."""
    v = value.encode()
    n = name.encode()
    yield "exact", [n + b": " + v]
    yield "lower", [n.lower() + b": " + v]
    yield "upper", [n.upper() + b": " + v]
    yield "mixed", [_mixed(name).encode() + b": " + v]
    if b"-" in n:  # `Forwarded` has no dash: its "underscore" spelling would be the real name
        yield "underscore", [n.replace(b"-", b"_") + b": " + v]
        yield "underscore-lower", [n.replace(b"-", b"_").lower() + b": " + v]
    yield "repeated", [n + b": " + v, n + b": " + v]
    yield "listed", [n + b": " + v + b", " + v]
    yield "folded", [n + b": x", b" " + v]
    yield "empty-then-forged", [n + b":", n + b": " + v]
    yield "no-space", [n + b":" + v]
    yield "tab-value", [n + b":\t" + v + b"\t"]
    yield "hop-by-hop", [b"Connection: " + n, n + b": " + v]
    yield "hop-by-hop-close", [b"Connection: close, " + n.lower(), n + b": " + v]


def _forgery() -> Iterator[Case]:
    for name, value in IDENTITY_HEADERS:
        for label, lines in forgery_lines(name, value):
            expect: Expect = "refuse" if label.startswith("underscore") else "either"
            yield Case(f"forge-{name.lower()}-{label}", "forgery", req(TARGET, *lines), expect)
    for name in ("X-Forwarded-For", "X-Neutron-Network-ID", "Host", "Content-Length"):
        # Ask the front to strip the very headers it adds (RFC 9110 §7.6.1 hop-by-hop).
        line = b"Connection: keep-alive, " + name.encode()
        yield Case(f"hop-by-hop-only-{name.lower()}", "forgery", req(TARGET, line))
    yield Case(
        "token-put-with-xff",
        "forgery",
        req(
            "/latest/api/token",
            b"X-aws-ec2-metadata-token-ttl-seconds: 21600",
            b"X-Forwarded-For: " + FORGED_IP.encode(),
            method=b"PUT",
        ),
        "refuse",
        403,
    )
    yield Case(
        "token-put-with-xff-lower",
        "forgery",
        req(
            "/latest/api/token",
            b"x-aws-ec2-metadata-token-ttl-seconds: 21600",
            b"x-forwarded-for: 127.0.0.1",
            method=b"PUT",
        ),
        "refuse",
        403,
    )
    # The IMDSv2 relay rule must hold for every spelling a metadata server routes to the token.
    for label, target in (
        ("trailing-slash", "/latest/api/token/"),
        ("double-slash", "//latest/api/token"),
        ("inner-double-slash", "/latest//api/token"),
        ("query", "/latest/api/token?x=1"),
        ("percent-encoded", "/latest/api/%74oken"),
        ("encoded-slash", "/latest%2fapi%2ftoken"),
        ("upper", "/LATEST/API/TOKEN"),
    ):
        yield Case(
            f"token-put-with-xff-{label}",
            "forgery",
            req(
                target,
                b"X-aws-ec2-metadata-token-ttl-seconds: 21600",
                b"X-Forwarded-For: " + FORGED_IP.encode(),
                method=b"PUT",
            ),
            "refuse",
            403,
        )
    yield Case(
        "token-put-clean",
        "forgery",
        req("/latest/api/token", b"X-aws-ec2-metadata-token-ttl-seconds: 21600", method=b"PUT"),
        "forward",
    )


def _protocol() -> Iterator[Case]:
    c = "protocol"
    for label, target in (
        ("absolute-self", "http://169.254.169.254/latest/meta-data/"),
        ("absolute-other", "http://attacker.example/latest/meta-data/"),
        ("absolute-https", "https://169.254.169.254/latest/"),
        ("absolute-userinfo", "http://a@169.254.169.254/latest/"),
        ("asterisk", "*"),
        ("authority", "169.254.169.254:80"),
    ):
        yield Case(f"target-{label}", c, req(target), "refuse")
    yield Case("connect", c, req("169.254.169.254:80", method=b"CONNECT"), "refuse")
    yield Case("connect-other", c, req("attacker.example:443", method=b"CONNECT"), "refuse")
    yield Case("connect-origin", c, req("/", method=b"CONNECT"), "refuse")
    for method in (
        b"TRACE",
        b"TRACK",
        b"DELETE",
        b"PATCH",
        b"OPTIONS",
        b"PROPFIND",
        b"FOO",
        b"get",
    ):
        yield Case(f"method-{method.decode()}", c, req(method=method), "refuse")
    yield Case("options-asterisk", c, req("*", method=b"OPTIONS"), "refuse")
    upgrade = (
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    )
    yield Case("upgrade-websocket", c, req("/", *upgrade), "refuse")
    yield Case(
        "upgrade-h2c",
        c,
        req(
            "/",
            b"Connection: Upgrade, HTTP2-Settings",
            b"Upgrade: h2c",
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        ),
        "refuse",
    )
    yield Case("upgrade-no-connection", c, req("/", b"Upgrade: h2c"), "refuse")
    yield Case(
        "expect-100",
        c,
        req(
            "/openstack/latest/password",
            b"Expect: 100-continue",
            cl(5),
            method=b"POST",
            body=b"hello",
        ),
    )
    yield Case(
        "expect-other",
        c,
        req("/openstack/latest/password", b"Expect: 200-ok", cl(5), method=b"POST", body=b"hello"),
    )
    yield Case(
        "expect-100-smuggle",
        c,
        req(
            "/openstack/latest/password",
            b"Expect: 100-continue",
            cl(5),
            method=b"POST",
            body=b"hello" + smuggled(),
        ),
        # Content-Length frames "hello"; the request after it is a genuine pipelined one
        # (RFC 9110 §10.1.1: the client may send content without waiting for 100), so two
        # forwards are right; check_upstream still demands the true identity on both.
        forwards=2,
        responses=2,
    )
    yield Case("http09", c, b"GET /latest/meta-data/\r\n")
    yield Case("http09-lf", c, b"GET /\n")
    yield Case(
        "http2-preface",
        c,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    )
    yield Case("tls-client-hello", c, bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40)
    yield Case("empty-line-only", c, b"\r\n\r\n", incomplete=True)
    yield Case("long-target-9k", c, req("/latest/" + "a" * 9000))
    yield Case("long-target-70k", c, req("/latest/" + "a" * 70000), "refuse")
    yield Case("long-header-value-70k", c, req(b"X-A: " + b"a" * 70000), "refuse")
    yield Case("long-header-name-9k", c, req(b"X-" + b"a" * 9000 + b": 1"))
    yield Case("long-method", c, req(method=b"G" * 9000), "refuse")
    for count in (63, 64, 65, 100, 101, 200, 1000):
        lines = [f"X-H{i}: {i}".encode() for i in range(count)]
        yield Case(
            f"header-count-{count}", c, req(TARGET, *lines), "refuse" if count >= 200 else "either"
        )
    yield Case(
        "many-small-headers-forged-last",
        c,
        req(TARGET, *[b"X-H: 1"] * 150, b"X-Forwarded-For: " + FORGED_IP.encode()),
    )
    yield Case("host-missing", c, req(host=False))
    yield Case("host-doubled", c, req(HOST))
    yield Case("host-evil", c, req(b"Host: attacker.example", host=False))
    yield Case("host-listed", c, req(b"Host: 169.254.169.254, attacker.example", host=False))
    for label, target in (
        ("dotdot", "/openstack/../../etc/passwd"),
        ("dotdot-encoded", "/openstack/%2e%2e/%2e%2e/etc/passwd"),
        ("dotdot-double-encoded", "/openstack/%252e%252e/etc/passwd"),
        ("dotdot-slash-encoded", "/openstack/..%2f..%2fetc%2fpasswd"),
        ("backslash-encoded", "/openstack/..%5c..%5cetc"),
        ("nul-encoded", "/openstack/latest/meta_data.json%00.txt"),
        ("utf8-overlong", "/openstack/%c0%ae%c0%ae/etc"),
    ):
        yield Case(f"traversal-{label}", c, req(target))
    yield Case("non-ascii-raw", c, req("/latest/é".encode()))
    yield Case("non-ascii-header", c, req("X-A: é".encode()))


def build() -> list[Case]:
    """The whole corpus; names are unique (checked by a test)."""
    return [*_framing(), *_forgery(), *_protocol()]


CORPUS: list[Case] = build()
