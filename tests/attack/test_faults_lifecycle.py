"""Lifecycle faults: a front killed with SIGKILL, a stale pidfile naming a live unrelated
process, symlinks planted where a pidfile, a config or a socket will be written.

Whatever happens, nothing metaproxy does not own is harmed: the unrelated process lives on, the
symlinks' targets keep their bytes and modes, and the front (or agent) recovers or refuses
clearly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attack import fronts, tally
from attack.backend import RawBackend, free_port
from attack.client import exchange
from attack.corpus import req
from support import cli

pytestmark = pytest.mark.slow
CLS = "lifecycle faults"


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A live process metaproxy does not own (what a stale pidfile may name after a reboot)."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def victim(short_tmp: Path) -> Path:
    """A file outside metaproxy's state that a planted symlink points at."""
    path = short_tmp / "victim"
    path.write_bytes(b"not yours\n")
    path.chmod(0o644)
    return path


def untouched(victim: Path) -> bool:
    return victim.read_bytes() == b"not yours\n" and (victim.stat().st_mode & 0o777) == 0o644


class Detached:
    """`metaproxy ns-proxy` without --foreground, and its --destroy, on 127.0.0.1."""

    def __init__(self, engine: str, state: Path, upstream: Path) -> None:
        self.engine = engine
        self.state = state
        self.port = free_port()
        self.pid_file = state / f"network-{fronts.NETWORK_ID}.pid"
        self.args = [
            "ns-proxy",
            "--engine",
            engine,
            "--network_id",
            fronts.NETWORK_ID,
            "--bind_address",
            "127.0.0.1",
            "--metadata_port",
            str(self.port),
            "--metadata_proxy_socket",
            str(upstream),
            "--state_path",
            str(state),
        ]

    def start(self) -> subprocess.CompletedProcess[str]:
        return cli.run(*self.args, timeout=60)

    def destroy(self) -> subprocess.CompletedProcess[str]:
        return cli.run(*self.args, "--destroy", timeout=60)

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def serves(self) -> bool:
        try:
            return exchange(("127.0.0.1", self.port), req(), timeout=5).statuses == [200]
        except OSError:
            return False


@pytest.fixture(params=fronts.engine_params())
def detached(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Detached]:
    with RawBackend(short_tmp / "agent.sock") as backend:
        front = Detached(request.param, short_tmp / "state", backend.path)
        try:
            yield front
        finally:
            front.destroy()
            pid = front.pid()
            if (
                pid
                and Path(f"/proc/{pid}").exists()
                and front.engine
                in " ".join(Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0"))
            ):
                os.kill(pid, signal.SIGKILL)


def _record(engine: str, name: str, ok: bool, detail: str = "") -> None:
    tally.fault(CLS, f"{engine} front", survived=ok, example=f"{name}: {detail}")


def test_sigkilled_front_is_cleaned_up_and_restarts(detached: Detached) -> None:
    started = detached.start()
    assert started.returncode == 0, started.stderr
    pid = detached.pid()
    assert pid and detached.serves()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    destroyed = detached.destroy()
    again = detached.start()
    ok = destroyed.returncode == 0 and again.returncode == 0 and detached.serves()
    _record(detached.engine, "SIGKILL then destroy and start", ok, destroyed.stderr[-200:])
    assert destroyed.returncode == 0, destroyed.stderr
    assert again.returncode == 0, again.stderr
    assert detached.serves()


def test_stale_pidfile_naming_a_live_stranger(
    detached: Detached, bystander: subprocess.Popen[bytes]
) -> None:
    detached.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    detached.pid_file.write_text(f"{bystander.pid}\n")
    destroyed = detached.destroy()  # must not signal the stranger
    started = detached.start()
    serving = started.returncode == 0 and detached.serves()
    alive = bystander.poll() is None
    ok = alive and serving and detached.pid() != bystander.pid
    _record(detached.engine, "stale pidfile names a live stranger", ok, started.stderr[-200:])
    assert alive, "the unrelated process was signalled"
    assert started.returncode == 0, started.stderr
    assert serving
    assert detached.pid() != bystander.pid
    assert destroyed.returncode in (0, 1), destroyed.stderr
    assert detached.destroy().returncode == 0
    assert bystander.poll() is None


def test_symlink_planted_at_the_pidfile(detached: Detached, victim: Path) -> None:
    detached.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    detached.pid_file.symlink_to(victim)
    started = detached.start()
    destroyed = detached.destroy()
    ok = untouched(victim)
    _record(detached.engine, "symlink at the pidfile", ok, started.stderr[-200:])
    assert ok, victim.read_bytes()
    assert victim.exists()
    assert destroyed.returncode in (0, 1)


HAPROXY_ONLY = [p for p in fronts.engine_params() if getattr(p, "id", "") == "haproxy"]


# Only the haproxy engine writes a config file and a stats socket.
@pytest.mark.parametrize("detached", HAPROXY_ONLY, indirect=True)
@pytest.mark.parametrize("suffix", [".conf", ".sock"], ids=["config", "stats-socket"])
def test_symlink_planted_at_a_haproxy_file(detached: Detached, victim: Path, suffix: str) -> None:
    conf_dir = detached.state / "haproxy"
    conf_dir.mkdir(mode=0o700, parents=True)
    (conf_dir / f"network-{fronts.NETWORK_ID}{suffix}").symlink_to(victim)
    started = detached.start()
    serving = started.returncode == 0 and detached.serves()
    detached.destroy()
    ok = untouched(victim) and serving
    _record(detached.engine, f"symlink at the {suffix} file", ok, started.stderr[-200:])
    assert untouched(victim)
    assert serving, started.stderr


def test_symlink_planted_at_the_agent_socket(short_tmp: Path, victim: Path) -> None:
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    sock = run / "agent.sock"
    sock.symlink_to(victim)
    secret = short_tmp / "secret"
    secret.write_text("attack-secret-2\n")
    store = short_tmp / "metaproxy.db"
    from metaproxy.metadata.store import SqliteStore

    SqliteStore(store).close()
    proc = cli.popen(
        "agent",
        "--shared-secret-file",
        str(secret),
        "--store",
        str(store),
        "--metadata_proxy_socket",
        str(sock),
        "--metadata-url",
        f"unix:{short_tmp / 'md.sock'}",
    )
    try:
        code = proc.wait(timeout=20)
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        code, err = None, proc.communicate(timeout=10)[1]
    ok = untouched(victim) and (code not in (None, 0) and "Traceback" not in err)
    tally.fault(CLS, "agent", survived=ok, example=f"symlink at the agent socket: {err[-200:]}")
    assert untouched(victim)
    assert code == 2, err
    assert "Traceback" not in err
