"""Front engines under test, and running one through the `metaproxy ns-proxy` CLI contract.

The contract suite (tests/system/test_front_contract.py) is parametrized over ENGINES and only
uses what this module offers: start a detached front with the CLI, talk to it, destroy it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import cli

ENGINES = ["haproxy", "builtin", "builtin-workers"]
# Pseudo-engines: an engine run with more flags (the contract must hold for every variant).
VARIANTS = {"builtin-workers": ("builtin", ("--workers", "2"))}


def engine_param(engine: str) -> object:
    """A pytest param for `engine`, skipped when its tools are truly missing."""
    marks: list[pytest.MarkDecorator] = []
    if engine == "haproxy":
        marks.append(pytest.mark.haproxy)
        missing = not any(os.path.exists(p) for p in ("/usr/sbin/haproxy", "/usr/bin/haproxy"))
        marks.append(pytest.mark.skipif(missing, reason="haproxy is not installed (CI has it)"))
    return pytest.param(engine, id=engine, marks=marks)


ENGINE_PARAMS = [engine_param(e) for e in ENGINES]


# Per-source limit tests that play instances with loopback addresses leave out the variant
# whose workers spread loopback clients by port (there the limits apply per worker, by design);
# tests/system/test_front_workers.py proves the limits across workers with real instance
# sources in a namespace.
SOURCE_LIMIT_ENGINE_PARAMS = [engine_param(e) for e in ENGINES if e != "builtin-workers"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's port-0 pick)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Front:
    """A running front started by the CLI; `args` re-run with --destroy stops it."""

    engine: str
    args: list[str]
    host: str
    port: int
    state_path: Path
    pid_file: Path
    started: subprocess.CompletedProcess[str]

    @property
    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def destroy(self) -> subprocess.CompletedProcess[str]:
        return cli.run(*self.args, "--destroy")


def ns_proxy_args(
    engine: str,
    state_path: Path,
    socket_path: Path,
    *,
    identity: tuple[str, str] = ("network", "net-1"),
    host: str = "127.0.0.1",
    port: int | None = None,
    netns: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    engine, more = VARIANTS.get(engine, (engine, ()))
    args = [
        "ns-proxy",
        "--engine",
        engine,
        f"--{identity[0]}_id",
        identity[1],
        "--bind_address",
        host,
        "--state_path",
        str(state_path),
        "--metadata_proxy_socket",
        str(socket_path),
        "--pid_file",
        str(state_path / "front.pid"),
    ]
    if port is not None:
        args += ["--metadata_port", str(port)]
    if netns:
        args += ["--netns", netns]
    return args + list(more) + list(extra)


@contextlib.contextmanager
def running_front(
    engine: str,
    state_path: Path,
    socket_path: Path,
    *,
    identity: tuple[str, str] = ("network", "net-1"),
    host: str = "127.0.0.1",
    port: int | None = None,
    netns: str | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[Front]:
    """Start a detached front via the CLI, yield it, and always destroy it afterwards."""
    if port is None and netns is None:
        port = free_port(host)
    args = ns_proxy_args(
        engine,
        state_path,
        socket_path,
        identity=identity,
        host=host,
        port=port,
        netns=netns,
        extra=extra,
    )
    started = cli.run(*args, timeout=90)
    front = Front(engine, args, host, port or 80, state_path, state_path / "front.pid", started)
    try:
        assert started.returncode == 0, f"ns-proxy failed: {started.stderr}"
        yield front
    finally:
        destroyed = front.destroy()
        if destroyed.returncode != 0:
            # Leave nothing running even when --destroy itself is what broke.
            with contextlib.suppress(OSError, ValueError):
                os.kill(front.pid, 9)
        assert destroyed.returncode == 0, f"--destroy failed: {destroyed.stderr}"


def exchange(
    host: str, port: int, raw: bytes, *, timeout: float = 10, source: str | None = None
) -> bytes:
    """Send raw request bytes, return everything the front answers until it closes.

    Requests should carry `Connection: close` so the answer ends with the connection.
    `source` binds the client first (another 127.x address is another instance to a front).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
        sock.sendall(raw)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


def status_of(response: bytes) -> int:
    """The status code on a response's first line (0 when there was no answer)."""
    line = response.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else 0


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
