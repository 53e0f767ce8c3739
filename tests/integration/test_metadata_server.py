"""The metadata server on real sockets: keep-alive, pipelining, HEAD, limits, Unix socket, and
`metaproxy metadata-server` as a process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from metaproxy.metadata.config import Listen, MetadataConfig
from metaproxy.metadata.server import MetadataServer
from metaproxy.metadata.store import SqliteStore
from support import cli as runner
from support.metadata import SECRET, VM1, identity, make_store


def _request(method: str, path: str, *, extra: bytes = b"", body: bytes = b"") -> bytes:
    head = b"".join(k + b": " + v + b"\r\n" for k, v in identity())
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + head + length + extra + b"\r\n" + body
    )


Answer = tuple[bytes, dict[bytes, bytes], bytes]


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, methods: str = "GET"
) -> list[Answer]:
    writer.write(data)
    await writer.drain()
    answers = []
    for method in methods.split():
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status, *lines = head.rstrip(b"\r\n").split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        length = int(headers.get(b"content-length", b"0"))
        body = b""
        if length and method != "HEAD":
            body = await asyncio.wait_for(reader.readexactly(length), 10)
        answers.append((status, headers, body))
    return answers


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await asyncio.wait_for(writer.wait_closed(), 5)


@pytest.fixture
def store(short_tmp: Path) -> Iterator[SqliteStore]:
    s = make_store(short_tmp / "metaproxy.db")
    yield s
    s.close()


@pytest.fixture
async def tcp_server(store: SqliteStore) -> AsyncIterator[MetadataServer]:
    config = MetadataConfig(SECRET, Listen("127.0.0.1", 0))
    async with MetadataServer(config, store) as server:
        yield server


async def _connect(server: MetadataServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_keep_alive_pipelining_and_head(tcp_server: MetadataServer) -> None:
    reader, writer = await _connect(tcp_server)
    data = (
        _request("GET", "/latest/meta-data/instance-id")
        + _request("HEAD", "/latest/meta-data/instance-id")
        + _request("GET", "/openstack/latest/user_data")
    )
    answers = await _exchange(reader, writer, data, "GET HEAD GET")
    assert answers[0][0] == b"HTTP/1.1 200 OK" and answers[0][2] == VM1.encode()
    # HEAD: same head (length included), no body — the next answer starts right after.
    assert answers[1][0] == b"HTTP/1.1 200 OK"
    assert answers[1][1][b"content-length"] == str(len(VM1)).encode()
    assert answers[2][0] == b"HTTP/1.1 200 OK" and answers[2][2].startswith(b"#cloud-config")
    await _close(writer)


async def test_each_answer_echoes_its_requests_sequence_number(
    tcp_server: MetadataServer,
) -> None:
    """What lets the agent pipeline to this server and check every answer is its own."""
    reader, writer = await _connect(tcp_server)
    data = (
        _request("GET", "/latest/meta-data/instance-id", extra=b"X-Metaproxy-Seq: 41\r\n")
        + _request("HEAD", "/latest/meta-data/instance-id", extra=b"x-metaproxy-seq: 42\r\n")
        + _request("GET", "/latest/meta-data/hostname")
        + _request("GET", "/latest/meta-data/instance-id", extra=b"X-Metaproxy-Seq: 43\r\n")
    )
    answers = await _exchange(reader, writer, data, "GET HEAD GET GET")
    assert [a[1].get(b"x-metaproxy-seq") for a in answers] == [b"41", b"42", None, b"43"]
    assert [a[2] for a in answers] == [VM1.encode(), b"", b"web-1", VM1.encode()]
    await _close(writer)


@pytest.mark.parametrize(
    "field",
    [b"X-Metaproxy-Seq: 1\r\nX-Metaproxy-Seq: 2\r\n", b"X-Metaproxy-Seq: 1x\r\n"],
    ids=["twice", "not-digits"],
)
async def test_a_bad_sequence_number_is_400(tcp_server: MetadataServer, field: bytes) -> None:
    reader, writer = await _connect(tcp_server)
    writer.write(_request("GET", "/latest/meta-data/instance-id", extra=field))
    raw = await asyncio.wait_for(reader.read(), 10)
    assert raw.startswith(b"HTTP/1.1 400 ") and b"seq" not in raw.lower()
    await _close(writer)


async def test_head_sends_no_body(tcp_server: MetadataServer) -> None:
    reader, writer = await _connect(tcp_server)
    writer.write(_request("HEAD", "/latest/meta-data/instance-id", extra=b"Connection: close\r\n"))
    raw = await asyncio.wait_for(reader.read(), 10)
    assert raw.endswith(b"\r\n\r\n") and VM1.encode() not in raw
    await _close(writer)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", b"400", id="not-http"),
        pytest.param(
            _request("POST", "/openstack/latest/password", body=b"x" * (65 * 1024)),
            b"413",
            id="body",
        ),
        pytest.param(_request("GET", "/" + "a" * 5000), b"431", id="long-target"),
        pytest.param(
            _request("GET", "/", extra=b"".join(b"X-%d: y\r\n" % i for i in range(80))),
            b"431",
            id="many-headers",
        ),
    ],
)
async def test_limits_close_the_connection(
    tcp_server: MetadataServer, data: bytes, status: bytes
) -> None:
    reader, writer = await _connect(tcp_server)
    writer.write(data)
    raw = await asyncio.wait_for(reader.read(), 10)  # EOF: the server closed
    assert raw.split(b" ", 2)[1] == status
    await _close(writer)


async def test_unix_socket(store: SqliteStore, short_tmp: Path) -> None:
    path = short_tmp / "md.sock"
    path.touch()
    config = MetadataConfig(SECRET, Listen(unix=path))
    with pytest.raises(Exception, match="exists and is not a socket"):
        await MetadataServer(config, store).start()
    path.unlink()
    async with MetadataServer(config, store) as server:
        assert server.address == f"unix:{path}"
        with pytest.raises(Exception, match="in use by another server"):
            await MetadataServer(config, store).start()  # a live socket is never stolen
        reader, writer = await asyncio.open_unix_connection(str(path))
        [(status, _, body)] = await _exchange(
            reader, writer, _request("GET", "/latest/meta-data/hostname")
        )
        assert status == b"HTTP/1.1 200 OK" and body == b"web-1"
        await _close(writer)
    assert not path.exists()


def test_command_serves_and_stops(short_tmp: Path) -> None:
    make_store(short_tmp / "metaproxy.db").close()
    (short_tmp / "secret").write_text(SECRET.reveal() + "\n")
    sock = short_tmp / "md.sock"
    config = short_tmp / "m.toml"
    config.write_text(
        f'[metadata]\nlisten = "unix:{sock}"\nshared_secret_file = "{short_tmp / "secret"}"\n'
        f'[store]\npath = "{short_tmp / "metaproxy.db"}"\n'
    )
    proc = runner.popen("metadata-server", "--config", str(config))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"serving metadata on unix:{sock}"
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(10)
        client.connect(str(sock))
        client.sendall(
            _request("GET", "/latest/meta-data/instance-id", extra=b"Connection: close\r\n")
        )
        raw = b""
        while chunk := client.recv(65536):
            raw += chunk
        client.close()
        assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(VM1.encode())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "metadata server stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    assert not sock.exists()


def test_command_refuses_an_empty_secret(short_tmp: Path) -> None:
    result = runner.run(
        "metadata-server", "--store", str(short_tmp / "m.db"), "--listen", "127.0.0.1:0"
    )
    assert result.returncode == 2 and "shared_secret is empty" in result.stderr


def test_bad_listen_is_a_config_error(short_tmp: Path) -> None:
    result = subprocess.run(
        runner.argv("metadata-server", "--store", str(short_tmp / "m.db"), "--listen", "nowhere"),
        capture_output=True, text=True, timeout=60, env=runner.env(
            METAPROXY_METADATA__SHARED_SECRET="x"), check=False,  # noqa: S106
    )  # fmt: skip
    assert result.returncode == 2 and "metadata.listen" in result.stderr


async def test_a_client_that_never_reads_is_throttled(tcp_server: MetadataServer) -> None:
    """Pipelined requests whose answers are never read: the server stops reading, stays up."""
    _, writer = await _connect(tcp_server)
    request = _request("GET", "/openstack/latest/user_data")
    sent = 0
    with contextlib.suppress(TimeoutError):
        for _ in range(20000):  # bounded: ~20 MB of requests at most
            writer.write(request * 50)
            await asyncio.wait_for(writer.drain(), 0.5)
            sent += 50
    assert sent < 20000 * 50  # the server stopped taking requests at some point
    writer.transport.abort()
    other_reader, other_writer = await _connect(tcp_server)  # and still serves others
    [(status, _, _)] = await _exchange(
        other_reader, other_writer, _request("GET", "/latest/meta-data/hostname")
    )
    assert status == b"HTTP/1.1 200 OK"
    await _close(other_writer)


# -- the rendered-bytes cache -----------------------------------------------------------------


async def test_cached_renderings_follow_a_store_change_within_refresh(
    tcp_server: MetadataServer, short_tmp: Path
) -> None:
    """Answers are kept as bytes per instance; another process's change shows after REFRESH."""
    import json

    from metaproxy.metadata import model, server
    from support.metadata import INVENTORY

    paths = ("/latest/meta-data/hostname", "/openstack/latest/meta_data.json")
    data = b"".join(_request("GET", p) for p in paths)
    reader, writer = await _connect(tcp_server)
    try:
        for _ in range(2):  # the second round is served from the cache
            first, meta = await _exchange(reader, writer, data, "GET GET")
            assert first[2] == b"web-1"
            assert json.loads(meta[2])["hostname"] == "web-1"
        changed = json.loads(json.dumps(INVENTORY))
        changed["instances"][0]["hostname"] = "renamed-1"
        admin = SqliteStore(short_tmp / "metaproxy.db")  # the admin CLI, another process
        admin.import_inventory(model.inventory_from_mapping(changed), replace=True)
        admin.close()
        await asyncio.sleep(server.REFRESH)  # the documented bound on staleness
        first, meta = await _exchange(reader, writer, data, "GET GET")
        assert first[2] == b"renamed-1"
        assert json.loads(meta[2])["hostname"] == "renamed-1"
    finally:
        await _close(writer)


async def test_every_meta_data_answer_has_its_own_seed(tcp_server: MetadataServer) -> None:
    import json

    data = _request("GET", "/openstack/latest/meta_data.json")
    reader, writer = await _connect(tcp_server)
    try:
        seeds = set()
        for _ in range(5):  # cached after the first: the seed is still new every time
            [(status, headers, body)] = await _exchange(reader, writer, data)
            assert status == b"HTTP/1.1 200 OK"
            assert int(headers[b"content-length"]) == len(body)
            seed = json.loads(body)["random_seed"]
            assert len(base64.b64decode(seed, validate=True)) == 512
            seeds.add(seed)
        assert len(seeds) == 5
    finally:
        await _close(writer)
