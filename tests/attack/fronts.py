"""Run a REAL front (`metaproxy ns-proxy --engine E --foreground`) on 127.0.0.1 for attacks.

The front's stderr goes to a file, not a pipe: an access log line per request would otherwise
fill the pipe and stall the front in the middle of a flood.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from attack.backend import free_port
from support import cli

ENGINES = ("haproxy", "builtin")
NETWORK_ID = "attack-net-0001"
ROUTER_ID = "attack-rtr-0001"


def skip_reason(engine: str) -> str | None:
    """Why `engine` cannot run here, or None (only a truly missing tool is a reason)."""
    if engine == "haproxy" and not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        return "haproxy is not installed (scripts/setup.sh installs it)"
    return None


def engine_params() -> list[object]:
    """pytest params for both engines, each skipped only when it truly cannot run."""
    params: list[object] = []
    for engine in ENGINES:
        reason = skip_reason(engine)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if engine == "haproxy":
            marks.append(pytest.mark.haproxy)
        params.append(pytest.param(engine, id=engine, marks=marks))
    return params


@dataclass
class Front:
    engine: str
    addr: tuple[str, int]
    proc: subprocess.Popen[str]
    log_path: Path
    identity_header: str
    identity: str

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def _wait_listening(front: Front, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not front.alive():
            raise RuntimeError(f"{front.engine} front exited early:\n{front.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(front.addr, timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{front.engine} front not listening after {timeout}s:\n{front.log_tail()}")


def stop(front: Front) -> None:
    """SIGTERM, bounded wait, then SIGKILL: a test never leaves a front behind."""
    if front.alive():
        front.proc.send_signal(signal.SIGTERM)
        try:
            front.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            front.proc.kill()
            front.proc.wait(timeout=10)


@contextlib.contextmanager
def running_front(
    engine: str,
    upstream: Path,
    state: Path,
    *,
    router: bool = False,
    timeouts: dict[str, float] | None = None,
    extra: tuple[str, ...] = (),
    port: int | None = None,
    host: str = "127.0.0.1",
) -> Iterator[Front]:
    """Start one front on <host>:<free port> relaying to the Unix socket `upstream`."""
    port = port or free_port(host)
    kind, ident = ("router", ROUTER_ID) if router else ("network", NETWORK_ID)
    argv = [
        "ns-proxy",
        "--engine",
        engine,
        "--foreground",
        f"--{kind}_id",
        ident,
        "--bind_address",
        host,
        "--metadata_port",
        str(port),
        "--metadata_proxy_socket",
        str(upstream),
        "--state_path",
        str(state),
        "--pid_file",
        str(state / f"{engine}-{port}.pid"),
    ]
    for name, value in (timeouts or {}).items():
        argv += [f"--timeout_{name}", str(value)]
    argv += list(extra)
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / f"{engine}-{port}.log"
    with log_path.open("w") as log_file:
        proc = cli.popen(
            *argv, stdout=log_file, stderr=subprocess.STDOUT, env=cli.env(PYTHONUNBUFFERED="1")
        )
    header = "X-Neutron-Router-ID" if router else "X-Neutron-Network-ID"
    front = Front(engine, (host, port), proc, log_path, header, ident)
    try:
        _wait_listening(front, timeout=30)
        yield front
    finally:
        stop(front)


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` and all its descendants, in KiB."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def raise_nofile(want: int) -> None:
    """Lift this process's open-file limit toward `want` (as far as the hard limit allows)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, want), hard if hard != resource.RLIM_INFINITY else want)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < want:
        target = want
        hard = want
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
