"""Real guest clients against the real stack: Debian's cloud-init readers (run by the system
python3, where the package lives) and a token-using client, through the real agent and the
embedded metadata server.

    client ──TCP──▶ test front ──Unix──▶ AgentServer ──TCP──▶ MetadataServer ──▶ SQLite store

The "test front" is a test-only stand-in for a real front (builtin/haproxy live inside network
namespaces on port 80): it does exactly the front's job for one network — drops the client's
identity headers and adds `X-Neutron-Network-ID` and `X-Forwarded-For` — so everything from the
agent on is the production code.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, UnixConnector, web

from metaproxy.agent.config import AgentConfig, UpstreamConfig
from metaproxy.agent.server import AgentServer
from metaproxy.metadata.config import Listen, MetadataConfig, TokenMode
from metaproxy.metadata.server import MetadataServer
from support.guest import READER_SCRIPT
from support.metadata import KEY1, KEY2, SECRET, USER_DATA, VM1, VM2, make_store

SYSTEM_PYTHON = "/usr/bin/python3"
CLIENT_TIMEOUT = 120


def _cloud_init_missing() -> str | None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing"
    if not Path("/usr/lib/python3/dist-packages/cloudinit/sources/helpers/openstack.py").exists():
        return "Debian's cloud-init package is not installed"
    return None


pytestmark = [
    pytest.mark.cloudinit,
    pytest.mark.skipif(_cloud_init_missing() is not None, reason=str(_cloud_init_missing())),
]

# Identity headers a front never passes on (any case); it sets its own.
_DROP = ("x-neutron-", "x-ovn-", "x-instance-id", "x-tenant-id", "x-forwarded-for", "forwarded")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


STATUSES = web.AppKey("statuses", list[int])


@dataclass
class Stack:
    url: str
    front_statuses: list[int]


async def _front(agent_socket: Path, network_id: str, client_ip: str) -> web.AppRunner:
    session = ClientSession(connector=UnixConnector(path=str(agent_socket)))
    statuses: list[int] = []

    async def relay(request: web.Request) -> web.StreamResponse:
        headers = {
            k: v
            for k, v in request.headers.items()
            if not k.lower().startswith(_DROP) and k.lower() not in _HOP
        }
        headers["X-Neutron-Network-ID"] = network_id
        headers["X-Forwarded-For"] = client_ip
        body = await request.read()
        async with session.request(
            request.method, f"http://agent{request.raw_path}", headers=headers, data=body
        ) as answer:
            payload = await answer.read()
            statuses.append(answer.status)
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            return web.Response(status=answer.status, body=payload, headers=kept)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    app[STATUSES] = statuses

    async def close_session(_: web.Application) -> None:
        await session.close()

    app.on_cleanup.append(close_session)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.fixture(params=["optional"])
def token_mode(request: pytest.FixtureRequest) -> TokenMode:
    mode: TokenMode = request.param
    return mode


@pytest.fixture(params=[("net-a", "169.254.20.10")])
def guest(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The (network, address) the test front speaks for: VM1's port by default."""
    value: tuple[str, str] = request.param
    return value


@pytest.fixture
async def stack(
    short_tmp: Path, token_mode: TokenMode, guest: tuple[str, str]
) -> AsyncIterator[Stack]:
    store = make_store(short_tmp / "metaproxy.db")
    config = MetadataConfig(SECRET, Listen("127.0.0.1", 0), tokens=token_mode)
    async with MetadataServer(config, store) as server:
        host, port = server.address.rsplit(":", 1)
        agent_config = AgentConfig(
            shared_secret=SECRET,
            socket_path=short_tmp / "agent.sock",
            upstream=UpstreamConfig(host=host, port=int(port)),
        )
        async with AgentServer(agent_config, store):
            runner = await _front(short_tmp / "agent.sock", *guest)
            try:
                addr = runner.addresses[0]
                yield Stack(f"http://{addr[0]}:{addr[1]}", runner.app[STATUSES])
            finally:
                await runner.cleanup()
    store.close()


async def _run_system_python(script: str, *args: str) -> tuple[dict[str, Any], str]:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "NO_PROXY": "*", "no_proxy": "*"}
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-c", script, *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    log = err.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out), log


@pytest.mark.timeout(CLIENT_TIMEOUT + 30)
async def test_cloud_init_readers_read_the_whole_instance(stack: Stack) -> None:
    got, log = await _run_system_python(READER_SCRIPT, stack.url)

    assert got["uuid"] == VM1 and got["instance-id"] == VM1
    assert got["hostname"] == "web-1" and got["local-hostname"] == "web-1"
    assert got["public_keys"] == {"first": KEY1, "second": KEY2}
    assert got["random_seed_len"] == 512
    assert got["dsmode"] == "net"
    assert got["userdata"] == USER_DATA.decode()
    assert got["vendordata"] == {"cloud-init": "#cloud-config\n{}"}
    assert got["vendordata2"] == {"static": {"hello": "world"}}
    [iface] = got["network_config"]["config"][:1]
    assert iface["type"] == "physical" and iface["name"] == "eth0"
    assert iface["mac_address"] == "fa:16:3e:11:22:33" and iface["mtu"] == 1450
    [subnet] = iface["subnets"]
    assert subnet["type"] == "static" and subnet["address"] == "169.254.20.10"
    assert subnet["netmask"] == "255.255.255.0"
    for ec2_md in (got["ec2"], got["os_ec2"]):
        assert ec2_md["instance-id"] == VM1
        assert ec2_md["local-ipv4"] == "169.254.20.10"
        assert ec2_md["placement"] == {"availability-zone": "zone-1a"}
        assert ec2_md["public-keys"] == {"first": KEY1, "second": KEY2}
        assert ec2_md["ami-launch-index"] == "2" and ec2_md["mac"] == "fa:16:3e:11:22:33"
    assert got["ec2_userdata"] == USER_DATA.decode()

    # No failed request, in the client's log or on the wire (the log is really captured: every
    # successful fetch is logged by url_helper as "Read from URL (200, Nb) after 1 attempts").
    assert log.count("Read from ") >= 20 and "(200, " in log
    for marker in ("Failed", "Traceback", "Exception", "HTTP Error", "UrlError", "Retrying"):
        assert marker not in log, log[-4000:]
    assert stack.front_statuses and set(stack.front_statuses) == {200}, stack.front_statuses
    assert len(stack.front_statuses) >= 20  # the whole walk happened, not a short cut


@pytest.mark.parametrize("guest", [("net-b", "169.254.30.10")], indirect=True)
@pytest.mark.timeout(CLIENT_TIMEOUT + 30)
async def test_cloud_init_logs_show_a_missing_optional_file(stack: Stack) -> None:
    """The control for the check above: a bare instance has no user data, and the same log
    check sees it (the read still succeeds: user_data is optional)."""
    got, log = await _run_system_python(READER_SCRIPT, stack.url, "fa:16:3e:44:55:66")
    assert got["uuid"] == VM2 and got["userdata"] == "" and got["ec2_userdata"] == ""
    assert "Failed reading optional path" in log and "/user_data" in log
    assert 404 in stack.front_statuses


# -- a client that uses session tokens ------------------------------------------------------------


def _http(method: str, url: str, headers: dict[str, str]) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, answer.read(), answer.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


TTL = "X-aws-ec2-metadata-token-ttl-seconds"


def _token_client(base: str) -> dict[str, Any]:
    """What IMDSv2 clients do: PUT for a token, send it on every GET, re-PUT after a 401."""
    seen: dict[str, Any] = {}
    status, token, headers = _http("PUT", f"{base}/latest/api/token", {TTL: "21600"})
    seen["put"] = (status, headers.get(TTL))
    auth = {"X-aws-ec2-metadata-token": token.decode()}
    seen["no_token"] = _http("GET", f"{base}/latest/meta-data/instance-id", {})[0]
    seen["instance_id"] = _http("GET", f"{base}/latest/meta-data/instance-id", auth)[:2]
    seen["user_data"] = _http("GET", f"{base}/latest/user-data/", auth)[:2]
    seen["document"] = json.loads(
        _http("GET", f"{base}/latest/dynamic/instance-identity/document", auth)[1]
    )
    stale = {"X-aws-ec2-metadata-token": token.decode()[:-2] + "AA"}
    seen["stale"] = _http("GET", f"{base}/latest/meta-data/hostname", stale)[0]
    status, fresh, _ = _http("PUT", f"{base}/latest/api/token", {TTL: "60"})
    auth = {"X-aws-ec2-metadata-token": fresh.decode()}
    seen["after_refresh"] = _http("GET", f"{base}/latest/meta-data/hostname", auth)[:2]
    seen["bad_ttl"] = _http("PUT", f"{base}/latest/api/token", {TTL: "21601"})[0]
    seen["client_xff"] = _http(
        "GET", f"{base}/latest/meta-data/instance-id", {**auth, "X-Forwarded-For": "169.254.9.9"}
    )[0]
    return seen


@pytest.mark.parametrize("token_mode", ["required"], indirect=True)
@pytest.mark.timeout(60)
async def test_token_client_in_required_mode(stack: Stack) -> None:
    seen = await asyncio.to_thread(_token_client, stack.url)
    assert seen["put"] == (200, "21600")
    assert seen["no_token"] == 401
    assert seen["instance_id"] == (200, VM1.encode())
    assert seen["user_data"] == (200, USER_DATA)
    assert seen["document"]["instanceId"] == VM1 and seen["document"]["region"] == "zone-1"
    assert seen["stale"] == 401
    assert seen["after_refresh"] == (200, b"web-1")
    assert seen["bad_ttl"] == 400
    # A client X-Forwarded-For is the front's to drop: the token and identity still hold.
    assert seen["client_xff"] == 200
