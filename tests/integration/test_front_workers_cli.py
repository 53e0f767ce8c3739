"""`ns-proxy --engine builtin --workers N` on loopback, as real processes (root: it forks
workers that drop privileges, like production)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import cli
from support.rawhttp import free_port
from support.recorder import Recorder

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="ns-proxy fronts run as root in CI"),
]


def _flags(recorder: Recorder, state: Path, port: int, *extra: str) -> list[str]:
    return [
        "ns-proxy",
        "--network_id",
        "net-w",
        "--bind_address",
        "127.0.0.1",
        "--metadata_port",
        str(port),
        "--state_path",
        str(state),
        "--metadata_proxy_socket",
        str(recorder.path),
        "--workers",
        "2",
        *extra,
    ]


def _alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def _wait_gone(pids: list[int], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), [p for p in pids if _alive(p)]


@pytest.fixture
def detached(recorder: Recorder, short_tmp: Path) -> Iterator[tuple[int, int, list[str]]]:
    """A detached 2-worker front: (parent pid, port, flags); destroyed afterwards."""
    state, port = short_tmp / "state", free_port()
    flags = _flags(recorder, state, port)
    started = cli.run(*flags)
    assert started.returncode == 0, started.stderr
    parent = int((state / "network-net-w.pid").read_text())
    group = [parent, *_children(parent)]
    try:
        yield parent, port, flags
    finally:
        destroyed = cli.run(*flags, "--destroy")
        for pid in group:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert destroyed.returncode == 0, destroyed.stderr


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_loopback_clients_are_spread_over_the_workers(
    detached: tuple[int, int, list[str]],
) -> None:
    """wrk and health checks have one address: the program spreads them by source port."""
    parent, port, _ = detached
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(24)]
    try:
        deadline = time.monotonic() + 15
        while True:  # a connection still in the accept queue shows no pid yet
            out = subprocess.run(
                ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            serving = {int(p) for p in re.findall(r"pid=(\d+)", out)}
            if serving == set(_children(parent)) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert serving == set(_children(parent)), out
    finally:
        for sock in held:
            sock.close()


def test_workers_die_with_a_killed_parent(detached: tuple[int, int, list[str]]) -> None:
    """A SIGKILLed parent cannot stop its workers: PR_SET_PDEATHSIG does."""
    parent, _, _ = detached
    children = _children(parent)
    assert len(children) == 2
    os.kill(parent, signal.SIGKILL)
    _wait_gone(children)


def test_foreground_group_stops_on_sigint(recorder: Recorder, short_tmp: Path) -> None:
    state, port = short_tmp / "state", free_port()
    proc = cli.popen(*_flags(recorder, state, port, "--foreground"))
    try:
        pid_file = state / "network-net-w.pid"
        deadline = time.monotonic() + 30
        while (not pid_file.exists() or len(_children(proc.pid)) < 2) and (
            time.monotonic() < deadline
        ):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert int(pid_file.read_text()) == proc.pid
        children = _children(proc.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        _wait_gone(children)
        assert not pid_file.exists()
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))  # nothing kept the port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
