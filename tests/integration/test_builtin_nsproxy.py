"""`metaproxy ns-proxy --engine builtin` as a real process: detach, serve, destroy, foreground."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from support import cli
from support.rawhttp import free_port
from support.recorder import Recorder


def _flags(recorder: Recorder, state: Path, port: int, *extra: str) -> list[str]:
    return [
        "ns-proxy",
        "--network_id",
        "net-cli",
        "--bind_address",
        "127.0.0.1",
        "--metadata_port",
        str(port),
        "--state_path",
        str(state),
        "--metadata_proxy_socket",
        str(recorder.path),
        *extra,
    ]


def _get(port: int, path: str = "/latest/meta-data/") -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read()


def _alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def test_detached_front_serves_then_destroy_removes_it(recorder: Recorder, short_tmp: Path) -> None:
    state = short_tmp / "state"
    port = free_port()
    started = cli.run(*_flags(recorder, state, port))
    assert started.returncode == 0, started.stderr
    pid_file = state / "network-net-cli.pid"
    pid = int(pid_file.read_text())
    try:
        assert oct(pid_file.stat().st_mode & 0o777) == "0o600"
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        assert _get(port) == (200, b"recorded\n")
        assert recorder.requests[0].values("X-Neutron-Network-ID") == ["net-cli"]
        again = cli.run(*_flags(recorder, state, port))
        assert again.returncode == 1
        assert "already served" in again.stderr
    finally:
        destroyed = cli.run(*_flags(recorder, state, port, "--destroy"))
    assert destroyed.returncode == 0, destroyed.stderr
    assert not pid_file.exists()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_detached_failure_is_reported_with_status(recorder: Recorder, short_tmp: Path) -> None:
    state = short_tmp / "state"
    result = cli.run(*_flags(recorder, state, free_port(), "--netns", "mp-no-such-ns-xyz"))
    assert result.returncode == 1
    assert "network namespace 'mp-no-such-ns-xyz' does not exist" in result.stderr
    assert not (state / "network-net-cli.pid").exists()


def test_unbindable_address_is_a_config_error(recorder: Recorder, short_tmp: Path) -> None:
    flags = _flags(recorder, short_tmp / "s", free_port())
    flags[flags.index("127.0.0.1")] = "169.254.169.254"
    result = cli.run(*flags)
    assert result.returncode == 2
    assert "cannot listen on 169.254.169.254" in result.stderr


def test_destroy_without_a_front_succeeds(recorder: Recorder, short_tmp: Path) -> None:
    result = cli.run(*_flags(recorder, short_tmp / "s", free_port(), "--destroy"))
    assert result.returncode == 0, result.stderr


def test_foreground_serves_until_sigterm(recorder: Recorder, short_tmp: Path) -> None:
    state = short_tmp / "state"
    port = free_port()
    proc = cli.popen(*_flags(recorder, state, port, "--foreground"))
    try:
        deadline = time.monotonic() + 20
        pid_file = state / "network-net-cli.pid"
        while not pid_file.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert int(pid_file.read_text()) == proc.pid
        assert _get(port)[0] == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "network=net-cli client=127.0.0.1 method=GET path=/latest/meta-data/" in err
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_pidfile_of_a_stranger_is_never_signalled(recorder: Recorder, short_tmp: Path) -> None:
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        (state / "network-net-cli.pid").write_text(f"{stranger.pid}\n")
        result = cli.run(*_flags(recorder, state, free_port(), "--destroy"))
        assert result.returncode == 0, result.stderr
        assert stranger.poll() is None
    finally:
        os.kill(stranger.pid, signal.SIGKILL)
        stranger.wait(timeout=10)


def _ids(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    uid = next(line for line in status.splitlines() if line.startswith("Uid:"))
    gid = next(line for line in status.splitlines() if line.startswith("Gid:"))
    return int(uid.split()[1]), int(gid.split()[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root (CI runs as root)")
def test_detached_front_drops_to_the_configured_user(recorder: Recorder, short_tmp: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    short_tmp.chmod(0o711)  # let the unprivileged front reach the agent socket
    state = short_tmp / "state"
    port = free_port()
    user = ("--metadata_proxy_user", "nobody", "--metadata_proxy_group", str(nobody.pw_gid))
    started = cli.run(*_flags(recorder, state, port, *user))
    assert started.returncode == 0, started.stderr
    pid = int((state / "network-net-cli.pid").read_text())
    try:
        assert _ids(pid) == (nobody.pw_uid, nobody.pw_gid)
        assert _get(port)[0] == 200
    finally:
        destroyed = cli.run(*_flags(recorder, state, port, "--destroy"))
    assert destroyed.returncode == 0, destroyed.stderr
    assert not (state / "network-net-cli.pid").exists()
