"""The agent against the real embedded metadata server and SQLite store: Nova's contract."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from metaproxy.agent.config import AgentConfig, UpstreamConfig
from metaproxy.agent.server import AgentServer
from metaproxy.config import Secret
from metaproxy.metadata.config import Listen, MetadataConfig
from metaproxy.metadata.model import Instance, Network, Port, Router
from metaproxy.metadata.server import MetadataServer
from metaproxy.metadata.store import SqliteStore
from support.agentkit import raw_request, request_bytes

SECRET = "end-to-end-Secret"  # noqa: S105 (a test secret)
OLD = "0b6a1f3e-5a4c-4e1d-9c2b-7d8e9f0a1b2c"
NEW = "9d2e4c6a-1b3f-4a5d-8e7c-6b5a4f3e2d1c"
NET = "net-e2e"
IP = "169.254.10.2"
MAC = "fa:16:3e:00:00:01"


@pytest.fixture
def store(short_tmp: Path) -> Iterator[SqliteStore]:
    db = SqliteStore(short_tmp / "state" / "metaproxy.db")
    db.add_network(Network(NET))
    db.add_router(Router("r-e2e", networks=(NET,)))
    db.add_instance(Instance(OLD, "proj-a", "old-vm", "old-vm"))
    db.add_port(Port("port-1", NET, MAC, OLD, (IP,)))
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
async def metadata(short_tmp: Path, store: SqliteStore) -> AsyncIterator[MetadataServer]:
    config = MetadataConfig(
        shared_secret=Secret(SECRET), listen=Listen(unix=short_tmp / "md.sock"), tokens="optional"
    )
    server = MetadataServer(config, store)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def agent_config(short_tmp: Path, secret: str = SECRET) -> AgentConfig:
    return AgentConfig(
        shared_secret=Secret(secret),
        socket_path=short_tmp / "run" / "agent.sock",
        upstream=UpstreamConfig(scheme="unix", unix_path=short_tmp / "md.sock"),
    )


def ident(kind: str = "network") -> list[tuple[str, str]]:
    if kind == "router":
        return [("X-Neutron-Router-ID", "r-e2e"), ("X-Forwarded-For", IP)]
    return [("X-Neutron-Network-ID", NET), ("X-Forwarded-For", IP)]


@pytest.mark.parametrize("kind", ["network", "router"])
async def test_signed_request_is_accepted_by_the_metadata_server(
    short_tmp: Path, store: SqliteStore, metadata: MetadataServer, kind: str
) -> None:
    async with AgentServer(agent_config(short_tmp), store) as agent:
        target = "/openstack/latest/meta_data.json"
        resp = await raw_request(agent.socket_path, request_bytes(ident(kind), target=target))
        assert resp.status == 200, resp.body
        assert json.loads(resp.body)["uuid"] == OLD
        ec2 = await raw_request(
            agent.socket_path,
            request_bytes(ident(kind), target="/latest/meta-data/instance-id"),
        )
        assert ec2.status == 200


async def test_wrong_secret_is_403(
    short_tmp: Path, store: SqliteStore, metadata: MetadataServer
) -> None:
    async with AgentServer(agent_config(short_tmp, "not-the-secret"), store) as agent:
        resp = await raw_request(agent.socket_path, request_bytes(ident()))
    assert resp.status == 403


async def test_imdsv2_token_round_trip_and_401_reaches_the_guest(
    short_tmp: Path, store: SqliteStore, metadata: MetadataServer
) -> None:
    async with AgentServer(agent_config(short_tmp), store) as agent:
        put = await raw_request(
            agent.socket_path,
            request_bytes(
                [*ident(), ("X-aws-ec2-metadata-token-ttl-seconds", "60")],
                method="PUT",
                target="/latest/api/token",
            ),
        )
        assert put.status == 200, put.body
        assert put.header("X-aws-ec2-metadata-token-ttl-seconds") == "60"
        token = put.body.decode()
        good = await raw_request(
            agent.socket_path,
            request_bytes(
                [*ident(), ("X-aws-ec2-metadata-token", token)],
                target="/latest/meta-data/instance-id",
            ),
        )
        assert (good.status, good.body.decode().strip()) == (200, OLD)
        bad = await raw_request(
            agent.socket_path,
            request_bytes(
                [*ident(), ("X-aws-ec2-metadata-token", "forged")],
                target="/latest/meta-data/instance-id",
            ),
        )
        assert bad.status == 401


async def test_port_moved_to_a_new_instance_is_found_despite_the_cache(
    short_tmp: Path, store: SqliteStore, metadata: MetadataServer
) -> None:
    target = "/openstack/latest/meta_data.json"
    async with AgentServer(agent_config(short_tmp), store) as agent:
        first = await raw_request(agent.socket_path, request_bytes(ident(), target=target))
        assert json.loads(first.body)["uuid"] == OLD
        # The old VM is deleted and a new one gets the same address within the cache's TTL.
        store.remove_instance(OLD, with_ports=True)
        store.add_instance(Instance(NEW, "proj-a", "new-vm", "new-vm"))
        store.add_port(Port("port-2", NET, "fa:16:3e:00:00:02", NEW, (IP,)))
        second = await raw_request(agent.socket_path, request_bytes(ident(), target=target))
        assert second.status == 200, second.body
        assert json.loads(second.body)["uuid"] == NEW
