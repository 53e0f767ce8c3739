"""`metaproxy agent` as a real process: config forms, the store, signals and clean exit."""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaproxy.metadata.model import Instance, Network, Port
from metaproxy.metadata.store import SqliteStore
from support import cli
from support.recorder import Recorder

SECRET = "cli-Secret-Value-42"  # noqa: S105 (a test secret)
INSTANCE = "6f1c2a9e-3b5d-4c7e-9f10-2a3b4c5d6e7f"
PROJECT = "proj-x"
NET = "net-cli"
CLIENT_IP = "169.254.10.2"


@pytest.fixture
def store(short_tmp: Path) -> Path:
    path = short_tmp / "state" / "metaproxy.db"
    db = SqliteStore(path)
    try:
        db.add_network(Network(NET))
        db.add_instance(Instance(INSTANCE, PROJECT, "vm", "vm"))
        db.add_port(Port("port-1", NET, "fa:16:3e:00:00:01", INSTANCE, (CLIENT_IP,)))
    finally:
        db.close()
    return path


@pytest.fixture
def upstream(short_tmp: Path) -> Iterator[Recorder]:
    with Recorder(short_tmp / "md.sock") as rec:
        yield rec


def wait_for_socket(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"agent exited with {proc.returncode}: {err}")
        if path.is_socket():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def get(path: Path, headers: dict[str, str], target: str = "/latest/meta-data/") -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def stop(proc: subprocess.Popen[str], signum: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    return proc.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_toml_config_serves_until_signal_and_cleans_up(
    short_tmp: Path, store: Path, upstream: Recorder, signum: int
) -> None:
    sock = short_tmp / "run" / "agent.sock"
    config = short_tmp / "metaproxy.toml"
    config.write_text(
        f"""
[agent]
socket = "{sock}"
socket_mode = "group"
shared_secret = "{SECRET}"
metadata_url = "unix:{upstream.path}"

[store]
path = "{store}"
"""
    )
    proc = cli.popen("--log-level", "DEBUG", "agent", "--config", str(config))
    try:
        wait_for_socket(sock, proc)
        answer = get(sock, {"X-Neutron-Network-ID": NET, "X-Forwarded-For": CLIENT_IP})
        assert answer.startswith(b"HTTP/1.1 200"), answer
        bad = get(sock, {"X-Neutron-Network-ID": NET, "X-Forwarded-For": "a, b"})
        assert bad.startswith(b"HTTP/1.1 400"), bad
    finally:
        code, err = stop(proc, signum)
    assert code == 0, err
    assert not sock.exists()
    [seen] = upstream.requests
    assert seen.values("X-Instance-ID") == [INSTANCE]
    signature = hmac.new(SECRET.encode(), INSTANCE.encode(), hashlib.sha256).hexdigest()
    assert seen.values("X-Instance-ID-Signature") == [signature]
    assert "serving on" in err  # DEBUG logging was on, and...
    assert SECRET not in err  # ...neither the secret...
    assert signature not in err  # ...nor the signature reached stderr


def test_neutron_ini_with_flag_overrides(short_tmp: Path, store: Path, upstream: Recorder) -> None:
    sock = short_tmp / "n" / "metadata_proxy"
    ini = short_tmp / "metadata_agent.ini"
    ini.write_text(
        f"""[DEFAULT]
state_path = {short_tmp / "n"}
metadata_proxy_shared_secret = {SECRET}
nova_metadata_host = 127.0.0.1
nova_metadata_port = 9
metadata_proxy_socket_mode = all
metadata_backlog = 64
"""
    )
    proc = cli.popen(
        "agent",
        "--config",
        str(ini),
        "--store",
        str(store),
        "--metadata-url",
        f"unix:{upstream.path}",
    )
    try:
        wait_for_socket(sock, proc)
        assert oct(sock.stat().st_mode & 0o777) == oct(0o666)
        answer = get(sock, {"X-Neutron-Network-ID": NET, "X-Forwarded-For": CLIENT_IP})
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert SECRET not in err
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('[agent]\nshared_secret = ""\n', id="toml-empty"),
        pytest.param("[agent]\n", id="toml-missing"),
        pytest.param("[DEFAULT]\nmetadata_proxy_shared_secret =\n", id="neutron-empty"),
    ],
)
def test_empty_secret_refuses_to_start(short_tmp: Path, store: Path, text: str) -> None:
    config = short_tmp / "agent.conf"
    config.write_text(text)
    sock = short_tmp / "run" / "agent.sock"
    result = cli.run(
        "agent",
        "--config",
        str(config),
        "--store",
        str(store),
        "--metadata_proxy_socket",
        str(sock),
    )
    assert result.returncode == 2
    assert "refuses to start without the secret" in result.stderr
    assert not sock.exists()


def test_secret_file_flag_fills_a_neutron_ini_without_secret(
    short_tmp: Path, store: Path, upstream: Recorder
) -> None:
    sock = short_tmp / "run" / "agent.sock"
    ini = short_tmp / "metadata_agent.ini"
    ini.write_text(f"[DEFAULT]\nmetadata_proxy_socket = {sock}\n")
    secret_file = short_tmp / "secret"
    secret_file.write_text(SECRET)
    proc = cli.popen(
        "agent",
        "--config",
        str(ini),
        "--store",
        str(store),
        "--shared-secret-file",
        str(secret_file),
        "--metadata_url",
        f"unix:{upstream.path}",
    )
    try:
        wait_for_socket(sock, proc)
        answer = get(sock, {"X-Neutron-Network-ID": NET, "X-Forwarded-For": CLIENT_IP})
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        code, err = stop(proc)
    assert code == 0, err
    signature = hmac.new(SECRET.encode(), INSTANCE.encode(), hashlib.sha256).hexdigest()
    assert upstream.requests[0].values("X-Instance-ID-Signature") == [signature]


def test_secret_is_not_accepted_on_the_command_line(short_tmp: Path) -> None:
    result = cli.run("agent", "--metadata_proxy_shared_secret", SECRET)
    assert result.returncode == 2
    assert "never taken on the command line" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_missing_store_is_a_clear_error(short_tmp: Path) -> None:
    secret_file = short_tmp / "secret"
    secret_file.write_text(SECRET)
    result = cli.run(
        "agent",
        "--shared-secret-file",
        str(secret_file),
        "--store",
        str(short_tmp / "absent.db"),
        "--metadata_proxy_socket",
        str(short_tmp / "agent.sock"),
    )
    assert result.returncode == 2
    assert "absent.db does not exist" in result.stderr
    assert SECRET not in result.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_workers_share_the_socket_and_stop_together(
    short_tmp: Path, store: Path, upstream: Recorder
) -> None:
    sock = short_tmp / "run" / "agent.sock"
    secret_file = short_tmp / "secret"
    secret_file.write_text(SECRET + "\n")
    proc = cli.popen(
        "agent",
        "--store",
        str(store),
        "--shared_secret_file",
        str(secret_file),
        "--metadata_proxy_socket",
        str(sock),
        "--metadata_url",
        f"unix:{upstream.path}",
        "--metadata_workers",
        "2",
        "--metadata_backlog",
        "77",
    )
    try:
        wait_for_socket(sock, proc)
        deadline = time.monotonic() + 20
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2
        for _ in range(6):
            answer = get(sock, {"X-Neutron-Network-ID": NET, "X-Forwarded-For": CLIENT_IP})
            assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert not sock.exists()
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
    assert len(upstream.requests) == 6
    assert SECRET not in err


def test_a_dead_worker_stops_the_agent(short_tmp: Path, store: Path, upstream: Recorder) -> None:
    sock = short_tmp / "run" / "agent.sock"
    secret_file = short_tmp / "secret"
    secret_file.write_text(SECRET)
    proc = cli.popen(
        "agent",
        "--store",
        str(store),
        "--shared_secret_file",
        str(secret_file),
        "--metadata_proxy_socket",
        str(sock),
        "--metadata_url",
        f"unix:{upstream.path}",
        "--metadata_workers",
        "2",
    )
    try:
        wait_for_socket(sock, proc)
        deadline = time.monotonic() + 20
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = _children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert f"worker {victim} exited (signal 9)" in err
    assert not sock.exists()
