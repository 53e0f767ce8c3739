"""The front contract, for every engine, through the `metaproxy ns-proxy` CLI only.

A real front relays to tests/support/recorder.py on a Unix socket; the recorder shows exactly
what an agent would receive. Engine-specific checks live elsewhere (test_haproxy_launch.py).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import cli, netns
from support.engines import (
    ENGINE_PARAMS,
    SOURCE_LIMIT_ENGINE_PARAMS,
    Front,
    exchange,
    free_port,
    ns_proxy_args,
    running_front,
    status_of,
)
from support.recorder import Recorder

pytestmark = pytest.mark.timeout(180)

SPOOFED = [
    "X-Neutron-Network-ID",
    "X-Neutron-Router-ID",
    "X-OVN-Network-ID",
    "X-Instance-ID",
    "X-Instance-ID-Signature",
    "X-Tenant-ID",
    "X-Metadata-Provider",
    "X-Metadata-Provider-Signature",
    "X-Forwarded-For",
    "Forwarded",
    "X-Real-IP",
]
IDENTITY_NAMES = {h.lower() for h in SPOOFED}


def _cases(name: str) -> list[str]:
    return [name, name.lower(), name.upper(), name.swapcase()]


@pytest.fixture(params=ENGINE_PARAMS)
def engine(request: pytest.FixtureRequest) -> str:
    if os.geteuid() != 0:
        pytest.skip("fronts run as root in CI (they bind, and haproxy drops to no user)")
    return str(request.param)


@pytest.fixture
def front(engine: str, short_tmp: Path, recorder: Recorder) -> Iterator[Front]:
    with running_front(engine, short_tmp / "state", recorder.path) as f:
        yield f


def _get(
    front: Front,
    target: str = "/latest/meta-data/",
    *headers: str,
    method: str = "GET",
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 169.254.169.254", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    return exchange(front.host, front.port, raw)


def test_detached_front_serves_with_its_pid_in_the_pidfile(front: Front) -> None:
    """The ns-proxy process model: exit 0 once serving, the serving pid in --pid_file."""
    assert front.pid_file.exists()
    os.kill(front.pid, 0)
    assert status_of(_get(front)) == 200


def test_destroy_stops_the_front_and_removes_its_files(
    engine: str, short_tmp: Path, recorder: Recorder
) -> None:
    with running_front(engine, short_tmp / "state", recorder.path) as f:
        pid = f.pid
        result = f.destroy()
        assert result.returncode == 0, result.stderr
        assert not f.pid_file.exists()
        assert (
            not Path(f"/proc/{pid}/cmdline").exists()
            or not Path(f"/proc/{pid}/cmdline").read_bytes()
        ), "the front's process is gone"
        leftovers = [p for p in (short_tmp / "state").rglob("*") if not p.is_dir()]
        assert leftovers == []


def test_identity_header_arrives_once_with_our_value(front: Front, recorder: Recorder) -> None:
    spoofed = [f"{case}: evil" for name in SPOOFED for case in _cases(name)]
    response = _get(front, "/latest/meta-data/", "User-Agent: cloud-init", *spoofed)
    assert status_of(response) == 200, response
    [seen] = recorder.requests
    assert seen.values("X-Neutron-Network-ID") == ["net-1"]
    assert seen.values("X-Forwarded-For") == ["127.0.0.1"]
    for name in IDENTITY_NAMES - {"x-neutron-network-id", "x-forwarded-for"}:
        assert seen.values(name) == [], f"spoofed {name} reached the agent"
    assert "evil" not in repr(seen.headers)
    assert seen.values("User-Agent") == ["cloud-init"]
    assert seen.target == "/latest/meta-data/"
    assert seen.method == "GET"


def test_router_front_sends_router_identity(
    engine: str, short_tmp: Path, recorder: Recorder
) -> None:
    with running_front(
        engine, short_tmp / "state", recorder.path, identity=("router", "rtr-9")
    ) as f:
        assert status_of(_get(f, "/", "X-Neutron-Network-ID: evil")) == 200
    [seen] = recorder.requests
    assert seen.values("X-Neutron-Router-ID") == ["rtr-9"]
    assert seen.values("X-Neutron-Network-ID") == []


def test_unlisted_client_headers_are_dropped(front: Front, recorder: Recorder) -> None:
    response = _get(
        front,
        "/latest/api/token",
        "X-aws-ec2-metadata-token-ttl-seconds: 21600",
        "X-Custom-Thing: x",
        "Cookie: a=b",
        method="PUT",
    )
    assert status_of(response) == 200
    [seen] = recorder.requests
    assert seen.values("X-aws-ec2-metadata-token-ttl-seconds") == ["21600"]
    assert seen.values("X-Custom-Thing") == []
    assert seen.values("Cookie") == []


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("X_Neutron_Network_ID: evil", id="identity-underscore"),
        pytest.param("x_forwarded_for: 10.0.0.1", id="xff-underscore"),
        pytest.param("X_Anything: 1", id="any-underscore"),
    ],
)
def test_header_names_with_underscores_are_refused(
    front: Front, recorder: Recorder, header: str
) -> None:
    assert status_of(_get(front, "/", header)) == 400
    assert recorder.requests == []


BAD_TARGET = frozenset({400})
BAD_METHOD = frozenset({405})
EITHER = frozenset({400, 405})


@pytest.mark.parametrize(
    ("request_line", "extra", "statuses"),
    [
        pytest.param("CONNECT 169.254.169.254:80 HTTP/1.1", (), EITHER, id="connect"),
        pytest.param("GET http://evil.example/latest HTTP/1.1", (), BAD_TARGET, id="absolute"),
        pytest.param("GET 169.254.169.254:80 HTTP/1.1", (), BAD_TARGET, id="authority-form"),
        pytest.param("OPTIONS * HTTP/1.1", (), EITHER, id="asterisk"),
        pytest.param("GET * HTTP/1.1", (), BAD_TARGET, id="get-asterisk"),
        pytest.param(
            "GET / HTTP/1.1", ("Upgrade: websocket", "Connection: Upgrade"), BAD_TARGET, id="ws"
        ),
        pytest.param(
            "GET / HTTP/1.1", ("Upgrade: h2c", "Connection: Upgrade"), BAD_TARGET, id="h2c"
        ),
        pytest.param("DELETE / HTTP/1.1", (), BAD_METHOD, id="delete"),
        pytest.param("TRACE / HTTP/1.1", (), BAD_METHOD, id="trace"),
        pytest.param("GET / HTTP/2.0", (), BAD_TARGET, id="version-2.0"),
        pytest.param("GET / HTTP/1.2", (), BAD_TARGET, id="version-1.2"),
    ],
)
def test_refused_requests_never_reach_the_agent(
    front: Front,
    recorder: Recorder,
    request_line: str,
    extra: tuple[str, ...],
    statuses: frozenset[int],
) -> None:
    """CONNECT, absolute-form/authority-form/`*` targets and Upgrade never reach the agent."""
    close = () if any(h.startswith("Connection") for h in extra) else ("Connection: close",)
    lines = [request_line, "Host: 169.254.169.254", *extra, *close, "", ""]
    raw = "\r\n".join(lines).encode()
    status = status_of(exchange(front.host, front.port, raw))
    assert status in statuses
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("method", "status"),
    [pytest.param("DELETE", 405, id="delete"), pytest.param("PATCH", 405, id="patch")],
)
def test_unlisted_method_is_405(front: Front, recorder: Recorder, method: str, status: int) -> None:
    assert status_of(_get(front, "/", method=method)) == status
    assert recorder.requests == []


def test_body_over_the_limit_is_413(front: Front, recorder: Recorder) -> None:
    response = _get(front, "/openstack/latest/password", method="POST", body=b"x" * 70000)
    assert status_of(response) == 413
    assert recorder.requests == []


def test_small_body_arrives_intact(front: Front, recorder: Recorder) -> None:
    body = b"p" * 256
    response = _get(front, "/openstack/latest/password", method="POST", body=body)
    assert status_of(response) == 200
    [seen] = recorder.requests
    assert seen.body == body
    assert seen.method == "POST"


def test_token_put_relayed_by_a_guest_proxy_is_403(front: Front, recorder: Recorder) -> None:
    """IMDSv2's rule: a PUT /latest/api/token carrying X-Forwarded-For gets no token."""
    response = _get(front, "/latest/api/token", "X-Forwarded-For: 169.254.1.1", method="PUT")
    assert status_of(response) == 403
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("version", "status"),
    [pytest.param("1.1", 400, id="http-1.1-refused"), pytest.param("1.0", 200, id="http-1.0-ok")],
)
def test_host_is_required_in_http_1_1(
    front: Front, recorder: Recorder, version: str, status: int
) -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400; HTTP/1.0 did not have it."""
    raw = f"GET /latest/meta-data/ HTTP/{version}\r\nConnection: close\r\n\r\n".encode()
    assert status_of(exchange(front.host, front.port, raw)) == status
    assert len(recorder.requests) == (1 if status == 200 else 0)


def test_query_string_is_kept(front: Front, recorder: Recorder) -> None:
    assert status_of(_get(front, "/latest/meta-data/?x=1")) == 200
    assert recorder.requests[0].target == "/latest/meta-data/?x=1"


@pytest.mark.netns
def test_instance_in_a_namespace_reaches_the_agent(
    engine: str, short_tmp: Path, recorder: Recorder, ns_pair: netns.Pair
) -> None:
    """curl http://169.254.169.254/ from the instance namespace, front listening via --netns."""
    with running_front(
        engine,
        short_tmp / "state",
        recorder.path,
        host=netns.METADATA_IP,
        netns=ns_pair.net_ns,
    ):
        result = ns_pair.curl(
            f"http://{netns.METADATA_IP}/latest/meta-data/instance-id",
            "-H",
            "X-Neutron-Network-ID: evil",
        )
        assert result.stdout.splitlines()[-1] == "200", result.stderr
    [seen] = recorder.requests
    assert seen.target == "/latest/meta-data/instance-id"
    assert seen.values("X-Neutron-Network-ID") == ["net-1"]
    assert seen.values("X-Forwarded-For") == [ns_pair.inst_ip]


@pytest.mark.netns
def test_ipv6_link_local_front_in_a_namespace(
    engine: str, short_tmp: Path, recorder: Recorder, ns_pair: netns.Pair
) -> None:
    """[fe80::a9fe:a9fe%iface]:80, the metadata address IPv6 guests use, needs --interface."""
    netns.ip(
        "-n", ns_pair.net_ns, "addr", "add", "fe80::a9fe:a9fe/64", "dev", ns_pair.net_if, "nodad"
    )
    netns.ip("-n", ns_pair.inst_ns, "addr", "add", "fe80::2/64", "dev", ns_pair.inst_if, "nodad")
    with running_front(
        engine,
        short_tmp / "state",
        recorder.path,
        host="fe80::a9fe:a9fe",
        netns=ns_pair.net_ns,
        extra=("--interface", ns_pair.net_if),
    ):
        result = ns_pair.curl(
            f"http://[fe80::a9fe:a9fe%25{ns_pair.inst_if}]/openstack/latest/meta_data.json",
            "--interface",
            ns_pair.inst_if,
        )
        assert result.stdout.splitlines()[-1] == "200", result.stderr
    [seen] = recorder.requests
    assert seen.values("X-Neutron-Network-ID") == ["net-1"]
    [xff] = seen.values("X-Forwarded-For")
    assert xff.startswith("fe80::"), xff


def test_foreground_serves_until_sigterm_then_removes_its_pidfile(
    engine: str, short_tmp: Path, recorder: Recorder
) -> None:
    """The ns-proxy process model: --foreground stays attached and cleans up on SIGTERM."""
    port = free_port()
    args = ns_proxy_args(engine, short_tmp / "state", recorder.path, port=port)
    pid_file = short_tmp / "state" / "front.pid"
    proc = cli.popen(*args, "--foreground")
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert proc.poll() is None, proc.communicate(timeout=30)
            assert time.monotonic() < deadline, "never wrote its pidfile"
            time.sleep(0.05)
        raw = b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
        assert status_of(exchange("127.0.0.1", port, raw)) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not pid_file.exists()
        with pytest.raises(OSError):
            exchange("127.0.0.1", port, raw, timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(("X-Pad: " + "a" * 9000,), id="head-over-8k"),
        pytest.param(tuple(f"X-Field-{i}: 1" for i in range(70)), id="70-fields"),
    ],
)
def test_oversized_head_is_431(front: Front, recorder: Recorder, headers: tuple[str, ...]) -> None:
    assert status_of(_get(front, "/", *headers)) == 431
    assert recorder.requests == []


def test_head_just_under_the_limits_passes(front: Front, recorder: Recorder) -> None:
    headers = ("X-Pad: " + "a" * 6000, *(f"X-Field-{i}: 1" for i in range(50)))
    assert status_of(_get(front, "/", *headers)) == 200
    assert len(recorder.requests) == 1


RATE_FLAGS = ("--rate_limit_enabled", "--base_window_duration", "60")


@pytest.mark.parametrize("engine", SOURCE_LIMIT_ENGINE_PARAMS, indirect=True)
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param(
            ("--base_query_rate_limit", "3", "--burst_query_rate_limit", "100"),
            [200, 200, 200, 429, 429],
            id="base-window",
        ),
        pytest.param(
            ("--base_query_rate_limit", "100", "--burst_query_rate_limit", "2"),
            [200, 200, 429, 429],
            id="burst-window",
        ),
    ],
)
def test_rate_limit_refuses_one_source_and_not_another(
    engine: str,
    short_tmp: Path,
    recorder: Recorder,
    flags: tuple[str, ...],
    expected: list[int],
) -> None:
    """Neutron's [metadata_rate_limiting], on both engines: 429 past the limit, never relayed,
    and counted per source address (127.0.0.2 is another instance to the front)."""
    extra = (*RATE_FLAGS, "--burst_window_duration", "60", *flags)
    with running_front(engine, short_tmp / "state", recorder.path, extra=extra) as front:
        statuses = [status_of(_get(front)) for _ in expected]
        other = status_of(exchange(front.host, front.port, _request(), source="127.0.0.2"))
    assert statuses == expected
    assert other == 200
    assert len(recorder.requests) == expected.count(200) + 1


def test_rate_limit_is_off_by_default(front: Front, recorder: Recorder) -> None:
    statuses = {status_of(_get(front)) for _ in range(15)}
    assert statuses == {200}


@pytest.mark.parametrize("engine", SOURCE_LIMIT_ENGINE_PARAMS, indirect=True)
def test_per_source_connection_cap_spares_other_sources(
    engine: str, short_tmp: Path, recorder: Recorder
) -> None:
    """--max_conn_per_source on both engines: one more connection from a source that holds
    the cap gets no answer from the agent (builtin: 429; haproxy: closed), another source
    does, and the source is served again once it lets one go."""
    extra = ("--max_conn_per_source", "3")
    with running_front(engine, short_tmp / "state", recorder.path, extra=extra) as front:
        held = [socket.create_connection((front.host, front.port), timeout=10) for _ in range(3)]
        try:
            time.sleep(0.3)  # both engines count a connection once accepted
            over = _status_or_reset(front)
            other = status_of(exchange(front.host, front.port, _request(), source="127.0.0.2"))
            held.pop().close()
            released = _retry_status(front)
        finally:
            for sock in held:
                sock.close()
    assert over in ({429} if engine == "builtin" else {0})
    assert other == 200
    assert released == 200
    assert len(recorder.requests) == 2


def _request(target: str = "/latest/meta-data/") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n".encode()


def _status_or_reset(front: Front) -> int:
    """The status of one request; 0 when the front closed or reset the connection instead."""
    try:
        return status_of(exchange(front.host, front.port, _request()))
    except (ConnectionResetError, BrokenPipeError):
        return 0


def _retry_status(front: Front, attempts: int = 20) -> int:
    """The first 200 within ~2 s: a closed socket is uncounted asynchronously."""
    status = 0
    for _ in range(attempts):
        status = _status_or_reset(front)
        if status == 200:
            break
        time.sleep(0.1)
    return status
