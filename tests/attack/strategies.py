"""Hypothesis strategies for hostile requests: built from the corpus's parts, then mutated."""

from __future__ import annotations

from hypothesis import strategies as st

from attack.corpus import CORPUS, FORGED_ID, FORGED_IP, IDENTITY_HEADERS, forgery_lines

METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"CONNECT", b"TRACE", b"OPTIONS", b"get", b"G ET"]
TARGETS = [
    b"/",
    b"/latest/meta-data/instance-id",
    b"/openstack/latest/meta_data.json",
    b"/latest/api/token",
    b"/openstack/../../etc/passwd",
    b"/%2e%2e/%2e%2e/etc/passwd",
    b"http://169.254.169.254/latest/",
    b"169.254.169.254:80",
    b"*",
    b"/a#b",
    b"/a b",
    b"//latest//api//token",
]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b""]
EOLS = [b"\r\n", b"\n", b"\r", b"\r\r\n"]
BENIGN = [
    b"Accept: */*",
    b"User-Agent: Cloud-Init/22.4.2",
    b"Content-Type: text/plain",
    b"X-aws-ec2-metadata-token-ttl-seconds: 21600",
    b"X-aws-ec2-metadata-token: AQAEAtoken",
    b"Connection: keep-alive",
    b"Connection: close",
    b"Expect: 100-continue",
    b"Accept-Encoding: gzip, deflate, br",
]
FRAMING = [
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length: 5, 5",
    b"Content-Length: +5",
    b"Content-Length: -1",
    b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: \x0bchunked",
    b"Transfer-Encoding: ,chunked",
    b"Transfer-Encoding: chunked, chunked",
    b"Upgrade: h2c",
    b"Connection: Upgrade",
    b"Host: 169.254.169.254",
    b"Host: attacker.example",
    b"Host:",
]
FORGED = [
    line
    for name, value in IDENTITY_HEADERS
    for _, lines in forgery_lines(name, value)
    for line in lines
]
BODIES = [b"", b"hello", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", CORPUS[0].raw]
NASTY_BYTES = [
    b"\x00",
    b"\r",
    b"\n",
    b"\x0b",
    b"\x7f",
    b" ",
    b"\t",
    b":",
    b",",
    b"_",
    b"\xff",
    b"#",
]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request assembled from hostile and benign parts, every line ending chosen separately."""
    # Weighted toward well-formed requests, so the accepting paths get exercised as well.
    method = draw(st.sampled_from([b"GET"] * 8 + [b"PUT", b"POST"] * 2 + METHODS))
    target = draw(
        st.sampled_from(TARGETS[:4] * 4 + TARGETS) | st.binary(max_size=40).map(lambda b: b"/" + b)
    )
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + VERSIONS))
    lines = draw(
        st.lists(
            st.sampled_from(BENIGN)
            | st.sampled_from(FORGED)
            | st.sampled_from(FRAMING)
            | st.builds(lambda n: b"X-Pad: " + b"p" * n, st.integers(0, 9000)),
            max_size=8,
        )
    )
    first = method + b" " + target + (b" " + version if version else b"")
    eols = draw(
        st.lists(
            st.sampled_from(EOLS[:1] * 6 + EOLS), min_size=len(lines) + 2, max_size=len(lines) + 2
        )
    )
    head = (
        first + eols[0] + b"".join(line + eol for line, eol in zip(lines, eols[1:], strict=False))
    )
    return head + eols[-1] + draw(st.sampled_from(BODIES))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A request, then a few byte-level mutations: insert, delete, duplicate, swap a line end."""
    data = bytearray(draw(requests()))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["insert", "delete", "dup", "eol"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(NASTY_BYTES) | st.binary(min_size=1, max_size=3))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "dup":
            end = min(len(data), pos + draw(st.integers(1, 40)))
            data[pos:pos] = data[pos:end]
        else:
            idx = data.find(b"\r\n", pos)
            if idx >= 0:
                data[idx : idx + 2] = draw(st.sampled_from(EOLS))
    return bytes(data)


def forged_markers() -> tuple[bytes, ...]:
    return (FORGED_ID.lower().encode(), FORGED_IP.encode())
