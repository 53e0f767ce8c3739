"""The agent end to end: real Unix socket in, real HTTP(S) metadata server out."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import socket
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metaproxy.agent.config import AgentConfig, UpstreamConfig, parse_metadata_url
from metaproxy.agent.server import AgentServer
from metaproxy.config import Secret
from metaproxy.errors import ConfigError
from support.agentkit import (
    FakePort,
    MemoryDirectory,
    MetadataServer,
    make_pki,
    raw_request,
    request_bytes,
)

SECRET = "s3cr3t-Shared-Value"  # noqa: S105 (a test secret)
NET = "net-a"
ROUTER = "rtr-1"
INSTANCE = "11111111-2222-3333-4444-555555555555"
PROJECT = "proj-1"
CLIENT_IP = "169.254.10.2"
MAC = "fa:16:3e:00:00:01"
LINK_LOCAL = "fe80::f816:3eff:fe00:1"  # EUI-64 of MAC


def ident(kind: str = "network", ip: str = CLIENT_IP) -> list[tuple[str, str]]:
    header = "X-Neutron-Network-ID" if kind == "network" else "X-Neutron-Router-ID"
    return [(header, NET if kind == "network" else ROUTER), ("X-Forwarded-For", ip)]


@pytest.fixture
def directory() -> MemoryDirectory:
    return MemoryDirectory(
        ports=[FakePort("port-1", NET, INSTANCE, PROJECT, CLIENT_IP, MAC)],
        routers={ROUTER: ["net-z", NET]},
    )


@pytest.fixture
async def metadata() -> AsyncIterator[MetadataServer]:
    server = await MetadataServer().start()
    try:
        yield server
    finally:
        await server.stop()


def make_config(short_tmp: Path, url: str, **changes: object) -> AgentConfig:
    upstream_changes = {
        k: changes.pop(k)
        for k in list(changes)
        if k in {f.name for f in dataclasses.fields(UpstreamConfig)}
    }
    upstream = UpstreamConfig(**parse_metadata_url(url), **upstream_changes)  # type: ignore[arg-type]
    base = AgentConfig(
        shared_secret=Secret(SECRET),
        socket_path=short_tmp / "run" / "agent.sock",
        socket_mode="user",
        upstream=upstream,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def agent(
    short_tmp: Path, directory: MemoryDirectory, metadata: MetadataServer
) -> AsyncIterator[AgentServer]:
    server = AgentServer(make_config(short_tmp, metadata.url), directory)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_signed_request_carries_exactly_the_agreed_headers(
    agent: AgentServer, metadata: MetadataServer
) -> None:
    data = request_bytes(
        [
            ("Accept", "*/*"),
            ("User-Agent", "Cloud-Init/22.4.2"),
            ("X-aws-ec2-metadata-token", "tok"),
            ("X-Instance-ID", "spoofed"),
            ("X-Tenant-ID", "spoofed"),
            ("Cookie", "x=1"),
            *ident(),
        ],
        target="/openstack/latest/meta_data.json?x=1&y=%2F",
    )
    resp = await raw_request(agent.socket_path, data)
    assert resp.status == 200
    assert resp.body == b"meta\n"
    assert resp.header("Content-Type") == "text/plain"
    assert resp.header("Server") == "metaproxy"
    [seen] = metadata.seen
    assert seen.method == "GET"
    assert seen.target == "/openstack/latest/meta_data.json?x=1&y=%2F"
    expected_sig = hmac.new(SECRET.encode(), INSTANCE.encode(), hashlib.sha256).hexdigest()
    names = {k.lower(): v for k, v in seen.headers}
    assert names.pop("host").startswith("127.0.0.1:")
    names.pop("content-length", None)
    assert names == {
        "accept": "*/*",
        "x-aws-ec2-metadata-token": "tok",
        "x-forwarded-for": CLIENT_IP,
        "x-instance-id": INSTANCE,
        "x-tenant-id": PROJECT,
        "x-instance-id-signature": expected_sig,
    }
    # No duplicates: every header name once.
    assert len(seen.headers) == len({k.lower() for k, _ in seen.headers})


async def test_body_and_method_are_relayed_and_token_ttl_returned(
    agent: AgentServer, metadata: MetadataServer
) -> None:
    metadata.extra_headers = {"X-aws-ec2-metadata-token-ttl-seconds": "21600", "Set-Cookie": "a"}
    data = request_bytes(
        [("X-aws-ec2-metadata-token-ttl-seconds", "21600"), *ident()],
        method="PUT",
        target="/latest/api/token",
        body=b"hello",
    )
    resp = await raw_request(agent.socket_path, data)
    assert resp.status == 200
    assert resp.header("X-aws-ec2-metadata-token-ttl-seconds") == "21600"
    assert resp.header("Set-Cookie") is None
    [seen] = metadata.seen
    assert (seen.method, seen.target, seen.body) == ("PUT", "/latest/api/token", b"hello")


async def test_request_larger_than_4k_is_read_whole(
    agent: AgentServer, metadata: MetadataServer
) -> None:
    # Identity headers placed after 6 KiB of headers and followed by a 20 KiB body: a reader that
    # stops at 4 KiB would miss both (Neutron's flaw).
    padding = [(f"X-Pad-{i}", "p" * 1000) for i in range(6)]
    body = os.urandom(20 * 1024)
    data = request_bytes([*padding, *ident()], method="POST", target="/x", body=body)
    assert len(data) > 4096 + len(body)
    resp = await raw_request(agent.socket_path, data)
    assert resp.status == 200
    [seen] = metadata.seen
    assert seen.body == body
    assert not any(k.lower().startswith("x-pad") for k, _ in seen.headers)


async def test_router_mode_finds_the_port_on_an_attached_network(
    agent: AgentServer, metadata: MetadataServer
) -> None:
    resp = await raw_request(agent.socket_path, request_bytes(ident("router")))
    assert resp.status == 200
    assert dict((k.lower(), v) for k, v in metadata.seen[0].headers)["x-instance-id"] == INSTANCE


@pytest.mark.parametrize(
    "address",
    [
        pytest.param(f"::ffff:{CLIENT_IP}", id="ipv4-mapped"),
        pytest.param(LINK_LOCAL, id="ipv6-link-local-eui64"),
    ],
)
async def test_client_address_forms(
    agent: AgentServer, metadata: MetadataServer, address: str
) -> None:
    resp = await raw_request(agent.socket_path, request_bytes(ident(ip=address)))
    assert resp.status == 200
    sent = dict((k.lower(), v) for k, v in metadata.seen[0].headers)
    assert sent["x-instance-id"] == INSTANCE
    assert sent["x-forwarded-for"] == (CLIENT_IP if "ffff" in address else LINK_LOCAL)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([*ident(), ("X-Neutron-Network-ID", NET)], id="network-twice"),
        pytest.param([*ident(), ("X-Neutron-Router-ID", ROUTER)], id="network-and-router"),
        pytest.param([*ident("router"), ("X-Neutron-Router-ID", ROUTER)], id="router-twice"),
        pytest.param([*ident(), ("X-Forwarded-For", CLIENT_IP)], id="two-forwarded-for"),
        pytest.param(ident(ip=f"{CLIENT_IP}, 169.254.10.3"), id="comma-list"),
        pytest.param(ident(ip="169.254.10.300"), id="invalid-address"),
        pytest.param(ident(ip="not-an-ip"), id="hostname"),
        pytest.param([("X-Forwarded-For", CLIENT_IP)], id="no-identity"),
        pytest.param([("X-Neutron-Network-ID", NET)], id="no-forwarded-for"),
        pytest.param(
            [("X-Neutron-Network-ID", "net\tx"), ("X-Forwarded-For", CLIENT_IP)],
            id="malformed-network-id",
        ),
        pytest.param([("x-neutron-network-id", NET), *ident()], id="network-twice-other-case"),
    ],
)
async def test_ambiguous_identity_is_400_and_nothing_goes_upstream(
    agent: AgentServer,
    metadata: MetadataServer,
    directory: MemoryDirectory,
    headers: list[tuple[str, str]],
) -> None:
    resp = await raw_request(agent.socket_path, request_bytes(headers))
    assert resp.status == 400
    assert metadata.seen == []
    assert directory.calls == 0


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(ident(ip="169.254.10.9"), id="unknown-ip"),
        pytest.param(
            [("X-Neutron-Network-ID", "net-other"), ("X-Forwarded-For", CLIENT_IP)],
            id="wrong-network",
        ),
        pytest.param(
            [("X-Neutron-Router-ID", "rtr-unknown"), ("X-Forwarded-For", CLIENT_IP)],
            id="unknown-router",
        ),
        pytest.param(ident(ip="fe80::1"), id="link-local-not-eui64"),
    ],
)
async def test_no_port_is_404_and_nothing_goes_upstream(
    agent: AgentServer, metadata: MetadataServer, headers: list[tuple[str, str]]
) -> None:
    resp = await raw_request(agent.socket_path, request_bytes(headers))
    assert resp.status == 404
    assert metadata.seen == []


async def test_two_matching_ports_is_404_never_a_guess(
    agent: AgentServer, metadata: MetadataServer, directory: MemoryDirectory
) -> None:
    directory.ports.append(FakePort("port-2", "net-z", "other", "proj-2", CLIENT_IP, MAC))
    resp = await raw_request(agent.socket_path, request_bytes(ident("router")))
    assert resp.status == 404
    assert metadata.seen == []


@pytest.mark.parametrize(
    ("upstream_status", "expected"),
    [
        pytest.param(200, 200, id="200"),
        pytest.param(400, 400, id="400"),
        pytest.param(401, 401, id="401-imdsv2-token"),
        pytest.param(403, 403, id="403"),
        pytest.param(404, 404, id="404"),
        pytest.param(409, 409, id="409"),
        pytest.param(500, 500, id="500"),
        pytest.param(502, 502, id="502"),
        pytest.param(503, 503, id="503"),
        pytest.param(504, 504, id="504"),
        pytest.param(201, 502, id="201-unexpected"),
        pytest.param(302, 502, id="302-unexpected"),
        pytest.param(405, 502, id="405-unexpected"),
        pytest.param(418, 502, id="418-unexpected"),
    ],
)
async def test_status_mapping(
    agent: AgentServer, metadata: MetadataServer, upstream_status: int, expected: int
) -> None:
    metadata.status = upstream_status
    resp = await raw_request(agent.socket_path, request_bytes(ident()))
    assert resp.status == expected


async def test_403_is_logged_as_a_likely_secret_mismatch(
    agent: AgentServer, metadata: MetadataServer, caplog: pytest.LogCaptureFixture
) -> None:
    metadata.status = 403
    with caplog.at_level(logging.WARNING, logger="metaproxy"):
        resp = await raw_request(agent.socket_path, request_bytes(ident()))
    assert resp.status == 403
    assert "secret" in caplog.text
    assert SECRET not in caplog.text


async def test_unreachable_upstream_is_503(short_tmp: Path, directory: MemoryDirectory) -> None:
    config = make_config(short_tmp, f"unix:{short_tmp / 'nobody.sock'}")
    async with AgentServer(config, directory) as server:
        resp = await raw_request(server.socket_path, request_bytes(ident()))
    assert resp.status == 503


async def test_unreachable_tcp_upstream_is_503(short_tmp: Path, directory: MemoryDirectory) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(short_tmp, f"http://127.0.0.1:{port}")
    async with AgentServer(config, directory) as server:
        resp = await raw_request(server.socket_path, request_bytes(ident()))
    assert resp.status == 503


async def test_slow_upstream_is_504(
    short_tmp: Path, directory: MemoryDirectory, metadata: MetadataServer
) -> None:
    metadata.delay = 3.0
    config = make_config(short_tmp, metadata.url, timeout=0.5)
    async with AgentServer(config, directory) as server:
        resp = await raw_request(server.socket_path, request_bytes(ident()))
    assert resp.status == 504


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="garbage"),
        pytest.param(b"", id="closed-without-answer"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", id="truncated"),
    ],
)
async def test_garbage_from_upstream_is_502(
    short_tmp: Path, directory: MemoryDirectory, answer: bytes
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    upstream_path = short_tmp / "garbage.sock"
    bad = await asyncio.start_unix_server(garbage, str(upstream_path))
    try:
        config = make_config(short_tmp, f"unix:{upstream_path}")
        async with AgentServer(config, directory) as server:
            resp = await raw_request(server.socket_path, request_bytes(ident()))
        assert resp.status == 502
    finally:
        bad.close()
        await bad.wait_closed()


async def test_unix_socket_upstream(short_tmp: Path, directory: MemoryDirectory) -> None:
    upstream = await MetadataServer().start(unix=short_tmp / "md.sock")
    try:
        async with AgentServer(make_config(short_tmp, upstream.url), directory) as server:
            resp = await raw_request(server.socket_path, request_bytes(ident()))
        assert resp.status == 200
        assert upstream.seen[0].target == "/latest/meta-data/instance-id"
    finally:
        await upstream.stop()


async def test_https_upstream_with_ca_and_client_certificate(
    short_tmp: Path, directory: MemoryDirectory
) -> None:
    pki = make_pki(short_tmp)
    upstream = await MetadataServer().start(ssl_context=pki.server_context())
    try:
        config = make_config(
            short_tmp,
            upstream.url,
            ca_cert=pki.ca,
            client_cert=pki.client_cert,
            client_key=pki.client_key,
        )
        async with AgentServer(config, directory) as server:
            resp = await raw_request(server.socket_path, request_bytes(ident()))
        assert resp.status == 200
        assert len(upstream.seen) == 1

        # Without the client certificate the server refuses the handshake: unreachable.
        no_client = make_config(short_tmp, upstream.url, ca_cert=pki.ca)
        async with AgentServer(no_client, directory) as server:
            resp = await raw_request(server.socket_path, request_bytes(ident()))
        assert resp.status in (502, 503)
        # Without the CA the server certificate is not trusted: unreachable, nothing served.
        no_ca = make_config(
            short_tmp, upstream.url, client_cert=pki.client_cert, client_key=pki.client_key
        )
        async with AgentServer(no_ca, directory) as server:
            resp = await raw_request(server.socket_path, request_bytes(ident()))
        assert resp.status == 503
        assert len(upstream.seen) == 1
        # The explicit insecure switch skips verification.
        insecure = make_config(
            short_tmp,
            upstream.url,
            insecure=True,
            client_cert=pki.client_cert,
            client_key=pki.client_key,
        )
        async with AgentServer(insecure, directory) as server:
            resp = await raw_request(server.socket_path, request_bytes(ident()))
        assert resp.status == 200
    finally:
        await upstream.stop()


async def test_keep_alive_reuses_one_upstream_connection(
    agent: AgentServer, metadata: MetadataServer
) -> None:
    for _ in range(5):
        resp = await raw_request(agent.socket_path, request_bytes(ident()))
        assert resp.status == 200
    assert len(metadata.seen) == 5
    pool = agent.upstream._pool
    assert pool is not None
    assert len(pool._idle) == 1  # one pooled connection served all five


# -- the cache ---------------------------------------------------------------------------------


async def test_second_request_does_no_lookup(
    agent: AgentServer, metadata: MetadataServer, directory: MemoryDirectory
) -> None:
    assert (await raw_request(agent.socket_path, request_bytes(ident("router")))).status == 200
    calls = directory.calls
    assert calls == 2  # router_networks + ports_by_ip
    assert (await raw_request(agent.socket_path, request_bytes(ident("router")))).status == 200
    assert directory.calls == calls
    assert len(metadata.seen) == 2


async def test_upstream_404_bypasses_the_cache_once_and_retries_a_moved_port(
    agent: AgentServer, metadata: MetadataServer, directory: MemoryDirectory
) -> None:
    assert (await raw_request(agent.socket_path, request_bytes(ident()))).status == 200
    # The port now belongs to a new instance; the old one is gone from the metadata server.
    directory.ports[0] = FakePort("port-1", NET, "new-instance", PROJECT, CLIENT_IP, MAC)
    metadata.statuses = [404, 200]
    calls = directory.calls
    resp = await raw_request(agent.socket_path, request_bytes(ident()))
    assert resp.status == 200
    assert directory.calls == calls + 1
    ids = [dict((k.lower(), v) for k, v in s.headers)["x-instance-id"] for s in metadata.seen]
    assert ids == [INSTANCE, INSTANCE, "new-instance"]
    # The refreshed entry is cached again.
    assert (await raw_request(agent.socket_path, request_bytes(ident()))).status == 200
    assert directory.calls == calls + 1


async def test_upstream_404_with_unchanged_identity_is_not_retried(
    agent: AgentServer, metadata: MetadataServer, directory: MemoryDirectory
) -> None:
    assert (await raw_request(agent.socket_path, request_bytes(ident()))).status == 200
    metadata.status = 404
    calls = directory.calls
    resp = await raw_request(agent.socket_path, request_bytes(ident()))
    assert resp.status == 404
    assert directory.calls == calls + 1  # looked up once more...
    assert len(metadata.seen) == 2  # ...but asked upstream only once


async def test_upstream_404_on_a_fresh_lookup_is_not_retried(
    agent: AgentServer, metadata: MetadataServer, directory: MemoryDirectory
) -> None:
    metadata.status = 404
    resp = await raw_request(agent.socket_path, request_bytes(ident()))
    assert resp.status == 404
    assert directory.calls == 1
    assert len(metadata.seen) == 1


# -- secrets -----------------------------------------------------------------------------------


async def test_secret_and_signature_reach_no_log(
    short_tmp: Path,
    directory: MemoryDirectory,
    metadata: MetadataServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    signature = hmac.new(SECRET.encode(), INSTANCE.encode(), hashlib.sha256).hexdigest()
    config = make_config(short_tmp, metadata.url)
    with caplog.at_level(logging.DEBUG):
        async with AgentServer(config, directory) as server:
            for status in (200, 403, 404, 418, 500):
                metadata.status = status
                await raw_request(server.socket_path, request_bytes(ident()))
            await raw_request(server.socket_path, request_bytes(ident(ip="bad")))
        logging.getLogger("test").info("config: %r", config)
    assert caplog.records
    assert SECRET not in caplog.text
    assert signature not in caplog.text
    assert SECRET not in repr(config)


# -- the socket --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "bits"),
    [
        pytest.param("user", 0o644, id="user"),
        pytest.param("group", 0o664, id="group"),
        pytest.param("all", 0o666, id="all"),
    ],
)
async def test_socket_mode_is_applied(
    short_tmp: Path, directory: MemoryDirectory, mode: str, bits: int
) -> None:
    old = os.umask(0o077)  # a restrictive umask must not change the result
    try:
        config = make_config(short_tmp, "http://127.0.0.1:9", socket_mode=mode)
        async with AgentServer(config, directory) as server:
            st = os.stat(server.socket_path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == bits
    finally:
        os.umask(old)


def _other_user() -> tuple[str, int]:
    import pwd

    for name in ("nobody", "daemon"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != os.geteuid():
            return name, entry.pw_gid
    pytest.skip("needs a user other than the current one (nobody or daemon)")


def _deduce_cases() -> list[object]:
    return [
        pytest.param({}, 0o644, id="no-proxy-user"),
        pytest.param({"proxy_user": "root"}, 0o644, id="root"),
        pytest.param({"proxy_user": str(os.geteuid())}, 0o644, id="our-uid"),
        pytest.param({"proxy_user": "OTHER"}, 0o664, id="other-user-no-group"),
        pytest.param(
            {"proxy_user": "OTHER", "proxy_group": str(os.getegid())}, 0o664, id="our-group"
        ),
        pytest.param({"proxy_user": "OTHER", "proxy_group": "OTHERGROUP"}, 0o666, id="all"),
    ]


@pytest.mark.parametrize(("fields", "bits"), _deduce_cases())
async def test_socket_mode_deduce_follows_neutron(
    short_tmp: Path, directory: MemoryDirectory, fields: dict[str, str], bits: int
) -> None:
    other, other_gid = _other_user()
    if other_gid == os.getegid():
        pytest.skip("the other user shares our group")
    resolved = {
        k: (other if v == "OTHER" else str(other_gid) if v == "OTHERGROUP" else v)
        for k, v in fields.items()
    }
    config = make_config(short_tmp, "http://127.0.0.1:9", socket_mode="deduce", **resolved)
    async with AgentServer(config, directory) as server:
        assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == bits


def _ss_backlog(path: Path) -> int:
    """Send-Q of a listening Unix socket in `ss -xl` is its backlog (sk_max_ack_backlog)."""
    out = subprocess.run(
        ["ss", "-xlnH"], capture_output=True, text=True, timeout=20, check=True
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if str(path) in fields:
            return int(fields[3])
    raise AssertionError(f"{path} not listed by ss -xl:\n{out}")


@pytest.mark.skipif(
    subprocess.run(["which", "ss"], capture_output=True, check=False).returncode != 0,
    reason="needs ss from iproute2 (installed by scripts/setup.sh)",
)
@pytest.mark.parametrize("backlog", [pytest.param(7, id="7"), pytest.param(333, id="333")])
async def test_backlog_is_applied(
    short_tmp: Path, directory: MemoryDirectory, backlog: int
) -> None:
    config = make_config(short_tmp, "http://127.0.0.1:9", backlog=backlog)
    async with AgentServer(config, directory) as server:
        assert _ss_backlog(server.socket_path) == backlog


async def test_stale_socket_is_replaced_and_removed_on_stop(
    short_tmp: Path, directory: MemoryDirectory, metadata: MetadataServer
) -> None:
    config = make_config(short_tmp, metadata.url)
    config.socket_path.parent.mkdir(mode=0o755)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(config.socket_path))
    stale.close()  # the file stays, nobody listens: a crashed agent's leftover
    async with AgentServer(config, directory) as server:
        resp = await raw_request(server.socket_path, request_bytes(ident()))
        assert resp.status == 200
    assert not config.socket_path.exists()
    assert list(config.socket_path.parent.iterdir()) == []


async def test_live_socket_is_not_stolen(short_tmp: Path, directory: MemoryDirectory) -> None:
    config = make_config(short_tmp, "http://127.0.0.1:9")
    async with AgentServer(config, directory):
        with pytest.raises(ConfigError, match="in use"):
            await AgentServer(config, directory).start()
        assert config.socket_path.exists()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
async def test_path_that_is_not_a_socket_is_refused(
    short_tmp: Path, directory: MemoryDirectory, kind: str
) -> None:
    config = make_config(short_tmp, "http://127.0.0.1:9")
    path = config.socket_path
    path.parent.mkdir(mode=0o755)
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(short_tmp / "elsewhere")
    with pytest.raises(ConfigError, match="not a socket"):
        await AgentServer(config, directory).start()
    assert path.is_symlink() or path.exists()


async def test_directory_writable_by_others_is_refused(
    short_tmp: Path, directory: MemoryDirectory
) -> None:
    config = make_config(short_tmp, "http://127.0.0.1:9")
    config.socket_path.parent.mkdir()
    config.socket_path.parent.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        await AgentServer(config, directory).start()
    assert not config.socket_path.exists()


# -- limits ------------------------------------------------------------------------------------


async def test_body_over_the_limit_is_413_and_nothing_goes_upstream(
    short_tmp: Path, directory: MemoryDirectory, metadata: MetadataServer
) -> None:
    config = make_config(short_tmp, metadata.url, max_body=1024)
    async with AgentServer(config, directory) as server:
        data = request_bytes(ident(), method="POST", body=b"x" * 1025)
        resp = await raw_request(server.socket_path, data)
        assert resp.status == 413
        ok = await raw_request(
            server.socket_path, request_bytes(ident(), method="POST", body=b"x" * 1024)
        )
        assert ok.status == 200
    assert [len(s.body) for s in metadata.seen] == [1024]


async def test_chunked_body_is_read_whole_and_bounded(
    short_tmp: Path, directory: MemoryDirectory, metadata: MetadataServer
) -> None:
    def chunked(body: bytes) -> bytes:
        head = request_bytes([*ident(), ("Transfer-Encoding", "chunked")], method="POST")
        pieces = [body[i : i + 700] for i in range(0, len(body), 700)]
        return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"

    config = make_config(short_tmp, metadata.url, max_body=4096)
    async with AgentServer(config, directory) as server:
        body = os.urandom(3000)
        assert (await raw_request(server.socket_path, chunked(body))).status == 200
        assert (await raw_request(server.socket_path, chunked(b"y" * 5000))).status == 413
    assert [s.body for s in metadata.seen] == [body]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([("X-Big", "b" * 17000)], id="one-big-field"),
        pytest.param([(f"X-Pad-{i}", "p" * 900) for i in range(20)], id="many-fields"),
    ],
)
async def test_head_over_the_limit_is_431_and_nothing_goes_upstream(
    agent: AgentServer, metadata: MetadataServer, headers: list[tuple[str, str]]
) -> None:
    resp = await raw_request(agent.socket_path, request_bytes([*headers, *ident()]))
    assert resp.status == 431
    assert resp.header("Connection") == "close"
    assert metadata.seen == []


async def test_too_many_headers_are_refused(agent: AgentServer, metadata: MetadataServer) -> None:
    data = request_bytes([*[(f"X-H{i}", "v") for i in range(150)], *ident()])
    resp = await raw_request(agent.socket_path, data)
    assert resp.status == 431
    assert metadata.seen == []


async def test_absolute_form_target_is_400(agent: AgentServer, metadata: MetadataServer) -> None:
    data = request_bytes(ident(), target="http://evil.example/latest/meta-data/")
    resp = await raw_request(agent.socket_path, data)
    assert resp.status == 400
    assert metadata.seen == []


async def test_store_failure_is_500_not_a_guess(
    agent: AgentServer, metadata: MetadataServer, directory: MemoryDirectory
) -> None:
    def broken(*args: object) -> list[object]:
        raise RuntimeError("database is locked")

    directory.ports_by_ip = broken  # type: ignore[method-assign]
    resp = await raw_request(agent.socket_path, request_bytes(ident()))
    assert resp.status == 500
    assert metadata.seen == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root (CI is root)")
async def test_group_mode_hands_the_socket_to_the_proxy_group(
    short_tmp: Path, directory: MemoryDirectory
) -> None:
    import grp

    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        gid = 65534
    config = make_config(short_tmp, "http://127.0.0.1:9", socket_mode="group", proxy_group=str(gid))
    async with AgentServer(config, directory) as server:
        st = os.stat(server.socket_path)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o664)


# -- the upstream client's framing and pooling ---------------------------------------------------


async def _raw_upstream(
    short_tmp: Path, answer: bytes, *, close: bool
) -> tuple[asyncio.Server, Path, list[bytes]]:
    """A Unix-socket server that answers every request with `answer` (then closes if asked)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.append(head)
                writer.write(answer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    path = short_tmp / "raw.sock"
    return await asyncio.start_unix_server(handle, str(path)), path, seen


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-close",
            b"until-close",
            id="close-delimited",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
            id="chunked",
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nold!", b"old!", id="http-1.0"),
    ],
)
async def test_upstream_framings(
    short_tmp: Path, directory: MemoryDirectory, answer: bytes, body: bytes
) -> None:
    raw, path, seen = await _raw_upstream(short_tmp, answer, close=True)
    try:
        async with AgentServer(make_config(short_tmp, f"unix:{path}"), directory) as server:
            for _ in range(2):
                resp = await raw_request(server.socket_path, request_bytes(ident()))
                assert (resp.status, resp.body) == (200, body)
        assert len(seen) == 2
    finally:
        raw.close()
        await raw.wait_closed()


async def test_connection_closed_while_idle_is_retried_once(
    short_tmp: Path, directory: MemoryDirectory
) -> None:
    # Keep-alive framing, but the server closes after each answer: the pooled connection is
    # dead by the next request, which must still succeed (on a fresh connection).
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    raw, path, seen = await _raw_upstream(short_tmp, answer, close=True)
    try:
        async with AgentServer(make_config(short_tmp, f"unix:{path}"), directory) as server:
            for _ in range(3):
                resp = await raw_request(server.socket_path, request_bytes(ident()))
                assert (resp.status, resp.body) == (200, b"ok")
                await asyncio.sleep(0.05)  # let the close arrive while idle
        assert len(seen) == 3
    finally:
        raw.close()
        await raw.wait_closed()


async def test_head_request_has_no_body(agent: AgentServer, metadata: MetadataServer) -> None:
    resp = await raw_request(agent.socket_path, request_bytes(ident(), method="HEAD"))
    assert resp.status == 200
    assert metadata.seen[0].method == "HEAD"


# -- the agent's own HTTP shell ----------------------------------------------------------------


async def _read_answers(reader: asyncio.StreamReader, count: int) -> list[tuple[int, bytes]]:
    answers = []
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answers.append((status, await reader.readexactly(length)))
    return answers


async def test_pipelined_requests_are_answered_in_order(
    agent: AgentServer, metadata: MetadataServer
) -> None:
    def keep_alive(target: str, headers: list[tuple[str, str]]) -> bytes:
        return request_bytes(headers, target=target).replace(b"Connection: close\r\n", b"")

    async with asyncio.timeout(20):
        reader, writer = await asyncio.open_unix_connection(str(agent.socket_path))
        try:
            writer.write(
                keep_alive("/one", ident())
                + keep_alive("/two", ident(ip="bad"))
                + keep_alive("/three", ident())
            )
            answers = await _read_answers(reader, 3)
            # The same connection serves a fourth request afterwards (keep-alive).
            writer.write(keep_alive("/four", ident()))
            answers += await _read_answers(reader, 1)
        finally:
            writer.close()
    assert [status for status, _ in answers] == [200, 400, 200, 200]
    assert [s.target for s in metadata.seen] == ["/one", "/three", "/four"]


async def test_malformed_request_is_400_and_closed(
    agent: AgentServer, metadata: MetadataServer
) -> None:
    resp = await raw_request(agent.socket_path, b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n")
    assert resp.status == 400
    assert resp.header("Connection") == "close"
    assert metadata.seen == []


async def test_idle_connection_is_closed(
    agent: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metaproxy.agent.protocol as protocol

    monkeypatch.setattr(protocol, "IDLE_TIMEOUT", 0.3)
    async with asyncio.timeout(20):
        reader, writer = await asyncio.open_unix_connection(str(agent.socket_path))
        writer.write(b"GET /half-a-head HTTP/1.1\r\nHost: x\r\n")  # a slow-loris front
        assert await reader.read() == b""  # closed by the agent, not by us
        writer.close()


async def test_stop_lets_a_request_in_flight_finish(
    short_tmp: Path, directory: MemoryDirectory, metadata: MetadataServer
) -> None:
    metadata.delay = 0.5
    server = AgentServer(make_config(short_tmp, metadata.url), directory)
    await server.start()
    in_flight = asyncio.create_task(raw_request(server.socket_path, request_bytes(ident())))
    while not metadata.seen:
        await asyncio.sleep(0.01)
    await server.stop()
    assert (await in_flight).status == 200
    assert not server.socket_path.exists()


async def test_a_pipelined_burst_is_throttled_but_fully_answered(
    agent: AgentServer, metadata: MetadataServer
) -> None:
    one = request_bytes(ident()).replace(b"Connection: close\r\n", b"")
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_unix_connection(str(agent.socket_path))
        try:
            writer.write(one * 40)  # more than the agent queues before it stops reading
            answers = await _read_answers(reader, 40)
        finally:
            writer.close()
    assert [status for status, _ in answers] == [200] * 40
    assert len(metadata.seen) == 40


async def test_stop_leaves_a_socket_someone_else_put_there(
    short_tmp: Path, directory: MemoryDirectory
) -> None:
    config = make_config(short_tmp, "http://127.0.0.1:9")
    server = AgentServer(config, directory)
    await server.start()
    config.socket_path.unlink()
    newcomer = socket.socket(socket.AF_UNIX)
    try:
        newcomer.bind(str(config.socket_path))  # e.g. a second agent started meanwhile
        await server.stop()
        assert config.socket_path.is_socket()
    finally:
        newcomer.close()


async def test_expect_100_continue_gets_its_interim_answer(
    agent: AgentServer, metadata: MetadataServer
) -> None:
    head = request_bytes([*ident(), ("Expect", "100-continue"), ("Content-Length", "5")])
    async with asyncio.timeout(20):
        reader, writer = await asyncio.open_unix_connection(str(agent.socket_path))
        try:
            writer.write(head)
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            [(status, _)] = await _read_answers(reader, 1)
        finally:
            writer.close()
    assert status == 200
    assert metadata.seen[0].body == b"hello"


async def test_waiting_for_a_pooled_connection_counts_against_the_timeout(
    short_tmp: Path, directory: MemoryDirectory, metadata: MetadataServer
) -> None:
    metadata.delay = 3.0
    config = make_config(short_tmp, metadata.url, pool_size=1, timeout=1.5)
    async with AgentServer(config, directory) as server, asyncio.timeout(20):
        started = asyncio.get_running_loop().time()
        answers = await asyncio.gather(
            raw_request(server.socket_path, request_bytes(ident())),
            raw_request(server.socket_path, request_bytes(ident())),
        )
        elapsed = asyncio.get_running_loop().time() - started
    assert [a.status for a in answers] == [504, 504]
    assert elapsed < 2.5  # both gave up after ~1.5 s, not one after the other (3 s)
