"""Faults under the manager (`metaproxy up`, real namespaces): planted symlinks at every path
it will write, a stale pidfile naming a live stranger, a front SIGKILLed, a namespace deleted.

The manager must come up and serve, recover what it owns, and harm nothing it does not own:
the stranger lives on, every symlink target keeps its bytes and mode, and after SIGTERM
nothing of the run is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from attack import fronts, tally
from metaproxy.metadata import model
from metaproxy.metadata.store import open_store
from support import netns
from support.hoststack import Stack, leftovers, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.netns, netns.requires_netns]
CLS = "manager faults"
IP = "169.254.10.2"


def _tenant(store: Path, network_id: str, n: int) -> None:
    db = open_store(store)
    try:
        db.add_network(model.network_from_mapping({"id": network_id}))
        uuid = f"{n:08x}-0000-4000-8000-000000000000"
        db.add_instance(
            model.instance_from_mapping(
                {"uuid": uuid, "project_id": f"p-{network_id}", "name": f"vm{n}"}
            )
        )
        db.add_port(
            model.port_from_mapping(
                {
                    "id": f"port-{network_id}",
                    "network_id": network_id,
                    "mac": f"fa:16:3e:00:01:0{n}",
                    "instance_id": uuid,
                    "fixed_ips": [IP],
                }
            )
        )
    finally:
        db.close()


def write_config(stack: Stack) -> None:
    stack.config.write_text(
        f'[service]\nstate_path = "{stack.state}"\nengine = "{stack.engine}"\n'
        f'metrics = "unix:{stack.state}/metrics.sock"\npoll_interval = 0.3\nstop_timeout = 5\n'
        f'\n[front]\nnetwork_netns = "mp-net-{{id}}"\n'
    )


def _record(engine: str, name: str, ok: bool, detail: str = "") -> None:
    tally.fault(CLS, f"up --engine {engine}", survived=ok, example=f"{name}: {detail}")


@pytest.fixture(params=fronts.engine_params())
def planted(
    request: pytest.FixtureRequest, short_tmp: Path
) -> Iterator[tuple[Stack, dict[Path, Path], subprocess.Popen[bytes]]]:
    """A stack whose state directory was booby-trapped before `metaproxy up` started."""
    engine: str = request.param
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    (state / "haproxy").mkdir(mode=0o700)
    outside = short_tmp / "outside"
    outside.mkdir()
    stack = Stack(state=state, config=short_tmp / "metaproxy.toml", engine=engine)
    stranger = subprocess.Popen(["sleep", "600"])
    traps: dict[Path, Path] = {}
    try:
        ids = []
        for n in (1, 2):
            tag = netns.suffix()
            stack.pairs[tag] = netns.create_pair(tag, inst_ip=IP)
            _tenant(state / "metaproxy.db", tag, n)
            ids.append(tag)
        first = ids[0]
        for rel in (
            f"network-{first}.pid",
            f"haproxy/network-{first}.conf",
        ):
            victim = outside / rel.replace("/", "_")
            victim.write_bytes(b"not yours\n")
            victim.chmod(0o644)
            (state / rel).symlink_to(victim)
            traps[state / rel] = victim
        # A stale pidfile for the second network names a live process that is not ours.
        (state / f"network-{ids[1]}.pid").write_text(f"{stranger.pid}\n")
        write_config(stack)
        stack.start()
        stack.wait_running(*ids)
        yield stack, traps, stranger
        code = stack.stop()
        # What the test planted and the engine never needed (the builtin engine writes no
        # per-front pidfile or config) is not the manager's to remove.
        planted_paths = {str(p) for p in traps if p.is_symlink()}
        stale = state / f"network-{ids[1]}.pid"
        if stale.exists() and stale.read_text().strip() == str(stranger.pid):
            planted_paths.add(str(stale))
        left = [
            p for p in leftovers(state) if p not in planted_paths and str(stranger.pid) not in p
        ]
        _record(engine, "SIGTERM leaves nothing behind", code == 0 and not left, str(left))
        assert code == 0, stack.stderr[-2000:]
        assert not left
    finally:
        stack.discard()
        alive = stranger.poll() is None
        stranger.kill()
        stranger.wait(timeout=10)
        untouched = all(
            v.read_bytes() == b"not yours\n" and v.stat().st_mode & 0o777 == 0o644
            for v in traps.values()
        )
        _record(engine, "stranger alive, symlink targets untouched", alive and untouched)
        assert alive, "metaproxy signalled a process it does not own"
        assert untouched, "a symlink planted in the state directory was followed"


def test_booby_trapped_state_then_kill_and_netns_loss(
    planted: tuple[Stack, dict[Path, Path], subprocess.Popen[bytes]],
) -> None:
    stack, _, stranger = planted
    first, second = list(stack.pairs)
    served = stack.serves(first) and stack.serves(second)
    _record(stack.engine, "serves despite planted symlinks and a stale pidfile", served)
    assert served
    assert stranger.poll() is None
    if stack.engine == "haproxy":
        pid = stack.front(first)["pid"]
        assert pid != stranger.pid
        os.kill(pid, signal.SIGKILL)
        try:
            wait_for(
                lambda: stack.front(first)["pid"] not in (None, pid) and stack.serves(first),
                8,
                "haproxy to be respawned",
            )
            ok = True
        except AssertionError:
            ok = False
        _record(stack.engine, "front SIGKILLed, respawned", ok)
        assert ok
    netns.ip("netns", "del", stack.pairs[first].net_ns)
    try:
        wait_for(lambda: stack.front(first)["state"] == "netns-gone", 15, "the loss reported")
        ok = stack.serves(second)
    except AssertionError:
        ok = False
    _record(stack.engine, "namespace deleted under a front, others serve", ok)
    assert ok
    assert stranger.poll() is None


@pytest.mark.parametrize(
    "name", ["control.sock", "metadata.sock", "metadata_proxy", "metrics.sock"]
)
@pytest.mark.parametrize("engine", fronts.engine_params())
def test_symlink_at_a_socket_path_is_refused_clearly(
    short_tmp: Path, engine: str, name: str
) -> None:
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    victim = short_tmp / "victim"
    victim.write_bytes(b"not yours\n")
    victim.chmod(0o644)
    (state / name).symlink_to(victim)
    stack = Stack(state=state, config=short_tmp / "metaproxy.toml", engine=engine)
    write_config(stack)
    stack.start()
    assert stack.proc is not None
    try:
        _, err = stack.proc.communicate(timeout=60)
    finally:
        if stack.proc.poll() is None:
            stack.proc.kill()
            stack.proc.communicate(timeout=10)
    untouched = victim.read_bytes() == b"not yours\n" and victim.stat().st_mode & 0o777 == 0o644
    clear = stack.proc.returncode != 0 and name in err and "Traceback" not in err
    left = [p for p in leftovers(state) if not p.endswith(name)]
    ok = untouched and clear and not left
    _record(engine, f"symlink at {name}: refused, target untouched", ok, err[-300:])
    assert untouched
    assert clear, err[-2000:]
    assert not left
