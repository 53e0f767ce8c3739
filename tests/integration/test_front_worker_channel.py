"""The manager's side of the front-worker channel, attacked by a worker that misbehaves.

A front worker parses guest traffic, so the manager must survive one that is compromised:
garbage, descriptors it has no business sending, unknown orders, and a flood of agent
connection requests it never reads the answers to. Each time the manager kills that worker
(a real process stands in for it here), keeps running, starts another, and holds no more file
descriptors than before.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from metaproxy.config import FrontSpec, Identity
from metaproxy.errors import MetaproxyError
from metaproxy.front import channel
from metaproxy.front.builtin import EngineOptions
from metaproxy.service import frontworkers
from metaproxy.service.frontworkers import WorkerEngine
from support.engines import free_port

Behaviour = Callable[[socket.socket], None]


def _order(sock: socket.socket) -> dict[str, object] | None:
    got = channel.receive_order(sock)
    if got is None:
        return None
    order, sockets = got
    for s in sockets:
        s.close()
    return order


def _serve_then(misbehave: Behaviour) -> Behaviour:
    """A worker that reports ready, answers `add`, then does `misbehave`."""

    def run(sock: socket.socket) -> None:
        channel.send_report(sock, {"op": "ready", "pid": 0, "uid": os.getuid()})
        while (order := _order(sock)) is not None:
            if order.get("op") == "add":
                spec = order["spec"]
                assert isinstance(spec, FrontSpec)
                channel.send_report(sock, {"op": "added", "name": spec.name})
                misbehave(sock)
                return

    return run


def _garbage(sock: socket.socket) -> None:
    sock.send(b"{not json")


def _descriptor(sock: socket.socket) -> None:
    socket.send_fds(sock, [b'{"op":"stats","fronts":{}}'], [0])


def _unknown(sock: socket.socket) -> None:
    channel.send_report(sock, {"op": "become-root"})


def _bad_stats(sock: socket.socket) -> None:
    channel.send_report(sock, {"op": "stats", "fronts": ["a"]})


def _connect_flood(sock: socket.socket) -> None:
    for ident in range(5000):
        try:
            channel.send_report(sock, {"op": "connect", "id": ident})
        except OSError:
            return


class FakeZygote:
    """Starts `sleep` as the worker's process and runs a behaviour on the worker's channel."""

    def __init__(self, first: Behaviour) -> None:
        self.behaviours = [first]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.threads: list[threading.Thread] = []

    def alive(self) -> bool:
        return True

    def spawn(self, worker_end: socket.socket, uid: int | None, gid: int | None) -> int:
        sock = socket.socket(fileno=os.dup(worker_end.fileno()))
        behaviour = self.behaviours.pop(0) if self.behaviours else _serve_then(lambda s: None)
        proc = subprocess.Popen(["sleep", "60"])
        self.procs.append(proc)

        def run() -> None:
            try:
                behaviour(sock)
                while (order := _order(sock)) is not None and order.get("op") != "close":
                    pass  # idle until the manager says close (or goes)
            except OSError:
                pass
            finally:
                sock.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        return proc.pid

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for thread in self.threads:
            thread.join(timeout=10)


async def _accept(sock: socket.socket) -> None:
    sock.close()  # an agent that takes the connection and hangs up


def _engine(zygote: FakeZygote) -> WorkerEngine:
    """The manager's engine on a fake zygote, as root-less as the test runs."""
    return WorkerEngine(
        zygote,  # type: ignore[arg-type]
        _accept,
        EngineOptions(),
        uid=None,
        gid=None,
        log_level="INFO",
        log_target="stderr",
    )


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    "misbehave",
    [
        pytest.param(_garbage, id="garbage"),
        pytest.param(_descriptor, id="sends-a-descriptor"),
        pytest.param(_unknown, id="unknown-op"),
        pytest.param(_bad_stats, id="malformed-stats"),
        pytest.param(_connect_flood, id="connect-flood"),
    ],
)
async def test_a_misbehaving_worker_is_killed_and_replaced(
    misbehave: Behaviour, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frontworkers, "BACKOFF", (0.05,))
    zygote = FakeZygote(_serve_then(misbehave))
    engine = _engine(zygote)
    spec = FrontSpec(
        Identity("network", "net-1"), short_tmp / "agent", "127.0.0.1", free_port(), short_tmp
    )
    baseline = _open_fds()
    try:
        await engine.start(spec)
        async with asyncio.timeout(10):
            while len(zygote.procs) < 2 or engine.worker is None or engine.worker.ended.is_set():
                await asyncio.sleep(0.02)
        first = zygote.procs[0]
        assert first.wait(timeout=5) == -9, "the misbehaving worker is killed"
        assert engine.respawns == 1
        assert zygote.procs[1].poll() is None, "its replacement runs"
        # The listener is handed to the replacement; nothing the bad worker caused stays open.
        assert _open_fds() <= baseline + 4
        assert json.dumps(engine.stats(spec.name).statuses) == "{}"
    finally:
        await engine.close()
        zygote.close()
    assert _open_fds() <= baseline + 1


async def test_a_worker_dying_during_an_add_leaves_no_half_served_front(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The add fails (the manager retries later), and the replacement worker is given only
    the listeners still registered: not the failed one behind the manager's back."""
    monkeypatch.setattr(frontworkers, "BACKOFF", (0.05,))
    adds: list[list[str]] = []

    def dies_on_add(sock: socket.socket) -> None:
        adds.append([])
        channel.send_report(sock, {"op": "ready", "pid": 0, "uid": os.getuid()})
        while (order := _order(sock)) is not None:
            if order.get("op") == "add":
                sock.close()  # gone without an answer
                return

    def records(sock: socket.socket) -> None:
        seen: list[str] = []
        adds.append(seen)
        channel.send_report(sock, {"op": "ready", "pid": 0, "uid": os.getuid()})
        while (order := _order(sock)) is not None and order.get("op") != "close":
            if order.get("op") == "add":
                spec = order["spec"]
                assert isinstance(spec, FrontSpec)
                seen.append(spec.name)
                channel.send_report(sock, {"op": "added", "name": spec.name})
        sock.close()  # told to close: the end of this worker

    zygote = FakeZygote(dies_on_add)
    zygote.behaviours.append(records)
    engine = _engine(zygote)
    spec = FrontSpec(
        Identity("network", "net-1"), short_tmp / "agent", "127.0.0.1", free_port(), short_tmp
    )
    try:
        with pytest.raises(MetaproxyError, match="front worker ended"):
            await engine.start(spec)
        assert engine.listeners == {}
        await engine.start(spec)  # the reconcile loop's next attempt
        assert adds == [[], [spec.name]]
    finally:
        await engine.close()
        zygote.close()


async def test_stats_for_fronts_never_given_are_ignored(short_tmp: Path) -> None:
    """A worker inventing front names must not grow the manager's memory."""
    engine = _engine(FakeZygote(_serve_then(lambda s: None)))
    ours, theirs = channel.pair()
    try:
        worker = frontworkers._Worker(ours, os.getpid())
        spec = FrontSpec(Identity("network", "net-1"), short_tmp / "a", "127.0.0.1", 80, short_tmp)
        engine.listeners[spec.name] = (spec, theirs)
        invented = {f"network-x{i}": {"requests": 1} for i in range(5000)}
        engine._heed(worker, {"op": "stats", "fronts": {**invented, spec.name: {"requests": 7}}})
        assert worker.stats == {spec.name: {"requests": 7}}
    finally:
        ours.close()
        theirs.close()
