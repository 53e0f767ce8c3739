"""The manager in one loop with the real store, agent and metadata server, and a fake engine.

No namespaces needed: this checks the manager's own logic — fronts from the config and the
store, reconcile on a store change and on reload, status over the control socket, metrics, and
a clean shutdown — everywhere, not only as root.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metaproxy.config import FrontSpec
from metaproxy.metadata import model
from metaproxy.service import control
from metaproxy.service.fronts import FrontStats
from metaproxy.service.host import Host, ensure_secret
from metaproxy.service.metrics import render
from metaproxy.service.roles import open_configured_store
from metaproxy.service.settings import Config, compose


class FakeEngine:
    kind = "fake"

    def __init__(self) -> None:
        self.running: dict[str, FrontSpec] = {}
        self.closed = False

    async def start(self, spec: FrontSpec) -> None:
        self.running[spec.name] = spec

    async def stop(self, name: str) -> None:
        self.running.pop(name, None)

    def stats(self, name: str) -> FrontStats:
        return FrontStats(pid=os.getpid(), requests=5, statuses={"200": 4, "404": 1})

    async def close(self) -> None:
        self.running.clear()
        self.closed = True


def _config(state: Path, *, extra: str = "") -> tuple[Config, Path]:
    path = state.parent / "m.toml"
    path.write_text(
        f'[service]\nstate_path = "{state}"\npoll_interval = 0.1\n'
        '[front]\nnetwork_netns = ""\n'
        '[[network]]\nid = "declared"\nnetns = ""\nbind_address = "127.0.0.1"\nport = 18080\n'
        + extra
    )
    import tomllib

    return compose(tomllib.loads(path.read_text()), {}, path), path


async def _until(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


@pytest.fixture
async def running(short_tmp: Path) -> AsyncIterator[tuple[Host, FakeEngine, Path]]:
    state = short_tmp / "state"
    cfg, path = _config(state)
    state.mkdir(mode=0o700)
    cfg = ensure_secret(cfg)
    engine = FakeEngine()
    host = Host(cfg, engine_factory=lambda _: engine, config_path=path, environ={})
    stop = asyncio.Event()
    task = asyncio.create_task(host.run(stop))
    async with asyncio.timeout(30):
        await host.ready.wait()
    try:
        yield host, engine, path
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task
    assert engine.closed
    left = sorted(p.name for p in state.iterdir() if p.is_socket())
    assert left == [], left


async def test_fronts_follow_the_config_and_the_store(
    running: tuple[Host, FakeEngine, Path],
) -> None:
    host, engine, path = running
    assert set(engine.running) == {"network-declared"}
    # An operator adds a network (another connection, as `metaproxy network add` does).
    store = open_configured_store(host.cfg)
    try:
        store.add_network(model.network_from_mapping({"id": "from-store"}))
    finally:
        store.close()
    await _until(lambda: "network-from-store" in engine.running)
    assert engine.running["network-from-store"].netns is None  # network_netns = "" → host
    # SIGHUP's path: the file gains a router and loses nothing.
    with path.open("a") as fh:
        fh.write('[[router]]\nid = "r1"\nnetns = ""\nbind_address = "127.0.0.1"\n')
    host.request_reload()
    await _until(lambda: "router-r1" in engine.running)
    assert engine.running["router-r1"].port == 9697
    store = open_configured_store(host.cfg)
    try:
        store.remove_network("from-store")
    finally:
        store.close()
    await _until(lambda: "network-from-store" not in engine.running)
    assert set(engine.running) == {"network-declared", "router-r1"}


async def test_a_bad_reload_keeps_the_running_config(
    running: tuple[Host, FakeEngine, Path], caplog: pytest.LogCaptureFixture
) -> None:
    host, engine, path = running
    path.write_text(path.read_text() + "[[network]]\nid = 'bad id'\n")
    host.request_reload()
    await _until(lambda: "keeping the running config" in caplog.text)
    assert set(engine.running) == {"network-declared"}


async def test_status_over_the_control_socket_and_metrics(
    running: tuple[Host, FakeEngine, Path],
) -> None:
    host, _, _ = running
    reply = await asyncio.to_thread(control.request, host.cfg.service.control_path, "status")
    assert reply["service"]["pid"] == os.getpid()
    [front] = reply["fronts"]
    assert front["name"] == "network-declared" and front["state"] == "running"
    assert front["address"] == "127.0.0.1:18080" and front["requests"] == 5
    assert reply["agent"]["state"] == "running"
    assert reply["agent"]["socket"] == str(host.cfg.service.agent_socket)
    assert reply["server"] == {
        "state": "running",
        "listen": f"unix:{host.cfg.service.metadata_socket}",
    }
    text = render(host.collect())
    assert (
        'metaproxy_requests_total{network="network-declared",engine="fake",status="404"} 1' in text
    )
    assert 'metaproxy_front_up{network="network-declared",engine="fake",state="running"} 1' in text
    assert "# TYPE metaproxy_upstream_latency_seconds histogram" in text
    secret = host.cfg.service.secret_path
    assert secret.stat().st_mode & 0o777 == 0o600


async def test_a_second_service_on_the_same_state_is_refused(
    running: tuple[Host, FakeEngine, Path],
) -> None:
    from metaproxy.errors import ConfigError

    host, _, _ = running
    other = Host(host.cfg, engine_factory=lambda _: FakeEngine())
    with pytest.raises(ConfigError, match="already running"):
        await other.run(asyncio.Event())


async def test_a_store_error_keeps_the_fronts_serving(
    running: tuple[Host, FakeEngine, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from metaproxy.errors import StoreError

    host, engine, _ = running
    real = host.roles.store_fronts
    failures = []

    def broken() -> list[tuple[str, str]]:
        failures.append(1)
        raise StoreError("database is locked")

    host.roles.store_fronts = broken  # type: ignore[method-assign]
    await _until(lambda: len(failures) >= 2)
    assert "reconciling the fronts failed" in caplog.text
    assert set(engine.running) == {"network-declared"}
    host.roles.store_fronts = real  # type: ignore[method-assign]
    store = open_configured_store(host.cfg)
    try:
        store.add_network(model.network_from_mapping({"id": "after"}))
    finally:
        store.close()
    await _until(lambda: "network-after" in engine.running)
