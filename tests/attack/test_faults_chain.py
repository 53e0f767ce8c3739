"""The metadata server broken behind the REAL agent (and behind each real front, when present):
down → 503, slow → 504, garbage or an early close → 502, and service resumes by itself.

The "metadata server" is the raw backend on a Unix socket, misbehaving on demand; the agent
is `metaproxy agent` as a real process with a real store and a 1 s upstream timeout.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from attack import fronts, tally
from attack.backend import RawBackend
from attack.client import Exchange, exchange
from attack.corpus import req
from metaproxy.metadata.model import Instance, Network, Port
from metaproxy.metadata.store import SqliteStore
from support import cli

pytestmark = pytest.mark.slow

SECRET = "attack-chain-Secret-1"  # noqa: S105 (a test secret)
INSTANCE = "0b7e2c1a-1111-4c7e-9f10-2a3b4c5d6e7f"
CLS = "metadata server faults"
FAST = 4.0


@dataclass
class Chain:
    agent_socket: Path
    server: RawBackend
    proc: subprocess.Popen[str]
    log: Path


@pytest.fixture(scope="module")
def chain(attack_tmp: Path) -> Iterator[Chain]:
    """A store with one instance at 127.0.0.1 on the front's network, the agent, the server."""
    state = attack_tmp / "chain"
    state.mkdir()
    db = SqliteStore(state / "metaproxy.db")
    try:
        db.add_network(Network(fronts.NETWORK_ID))
        db.add_instance(Instance(INSTANCE, "proj-a", "vm", "vm"))
        db.add_port(
            Port("port-a", fronts.NETWORK_ID, "fa:16:3e:00:00:0a", INSTANCE, ("127.0.0.1",))
        )
    finally:
        db.close()
    server = RawBackend(state / "md.sock").start()
    sock = state / "agent.sock"
    config = state / "metaproxy.toml"
    config.write_text(
        f'[agent]\nsocket = "{sock}"\nsocket_mode = "all"\nshared_secret = "{SECRET}"\n'
        f'metadata_url = "unix:{server.path}"\ntimeout = 1.0\nconnect_timeout = 1.0\n'
        f'cache_ttl = 0\n\n[store]\npath = "{state / "metaproxy.db"}"\n'
    )
    log = state / "agent.log"
    with log.open("w") as fh:
        proc = cli.popen("agent", "--config", str(config), stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not sock.is_socket():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "agent socket did not appear"
            time.sleep(0.05)
        yield Chain(sock, server, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        server.stop()


@pytest.fixture(scope="module", params=fronts.engine_params())
def chain_front(
    request: pytest.FixtureRequest, chain: Chain, attack_tmp: Path
) -> Iterator[fronts.Front]:
    engine: str = request.param
    with fronts.running_front(
        engine,
        chain.agent_socket,
        attack_tmp / f"chain-{engine}",
        timeouts={"server": 5, "connect": 2, "http_request": 3, "http_keep_alive": 3},
    ) as running:
        yield running


def via_agent(chain: Chain) -> Exchange:
    """Ask the agent directly, as a front would (identity and peer set)."""
    raw = req(
        "/latest/meta-data/instance-id",
        b"X-Neutron-Network-ID: " + fronts.NETWORK_ID.encode(),
        b"X-Forwarded-For: 127.0.0.1",
    )
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(chain.agent_socket))
        return exchange(("", 0), raw, sock=s, timeout=10)


FAULTS = [
    pytest.param("down", 0.0, 503, id="server-down"),
    pytest.param("slow", 3.0, 504, id="server-slow"),
    pytest.param("hang", 30.0, 504, id="server-hangs"),
    pytest.param("garbage", 0.0, 502, id="server-garbage"),
    pytest.param("close", 0.0, 502, id="server-closes"),
    pytest.param("close-mid", 0.0, 502, id="server-closes-mid-response"),
]


def _inject(server: RawBackend, mode: str, delay: float) -> None:
    server.reset()
    if mode == "down":
        server.stop()
    else:
        server.mode, server.delay = mode, delay  # type: ignore[assignment]


def _heal(server: RawBackend) -> None:
    if server._sock is None:
        server.start()
    server.reset()


def _check(target: str, name: str, ask: object, server: RawBackend, want: int) -> None:
    ex: Exchange = ask()  # type: ignore[operator]
    _heal(server)
    healed: Exchange = ask()  # type: ignore[operator]
    status = ex.statuses[0] if ex.statuses else 0
    ok = status == want and ex.elapsed < FAST and healed.statuses == [200]
    detail = f"{status} in {ex.elapsed:.2f}s, then {healed.statuses}"
    tally.fault(CLS, target, survived=ok, example=f"{name}: {detail}")
    tally.note(f"{target}, metadata server {name}: {detail}")
    assert status == want, (ex.statuses, ex.garbage[:80])
    assert ex.elapsed < FAST, ex.elapsed
    assert healed.statuses == [200], healed.statuses


@pytest.mark.parametrize(("mode", "delay", "want"), FAULTS)
def test_agent_maps_server_faults(chain: Chain, mode: str, delay: float, want: int) -> None:
    _inject(chain.server, mode, delay)
    try:
        _check("agent", mode, lambda: via_agent(chain), chain.server, want)
    finally:
        _heal(chain.server)
    assert chain.proc.poll() is None, chain.log.read_text()[-2000:]


@pytest.mark.parametrize(("mode", "delay", "want"), FAULTS)
def test_front_and_agent_map_server_faults(
    chain_front: fronts.Front, chain: Chain, mode: str, delay: float, want: int
) -> None:
    _inject(chain.server, mode, delay)
    try:
        _check(
            f"{chain_front.engine} front + agent",
            mode,
            lambda: exchange(chain_front.addr, req("/latest/meta-data/instance-id"), timeout=10),
            chain.server,
            want,
        )
    finally:
        _heal(chain.server)
