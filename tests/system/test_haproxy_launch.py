"""The haproxy engine's launch contract, with the real Debian haproxy, as root.

Each test names the finding of the security review it proves (ARCHITECTURE.md, "The launch
contract"); each would fail on Neutron's old code:
  1. `which haproxy` / $PATH lookup ran whatever binary came first;
  2. the config was written with default permissions, through whatever sat at the path;
  3. `os.execl` passed the caller's whole environment and every open descriptor;
  4. cleanup errors other than ENOENT were swallowed without a log line.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaproxy.config import FrontSpec, Identity
from metaproxy.errors import ProcessError
from metaproxy.haproxy import engine
from support import cli
from support.engines import exchange, free_port, ns_proxy_args, running_front, status_of
from support.recorder import Recorder

HAPROXY = Path("/usr/sbin/haproxy")

pytestmark = [
    pytest.mark.haproxy,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not HAPROXY.exists(), reason="haproxy is not installed (CI installs it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)"),
]
NOBODY = 65534
GET = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _gone(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


@pytest.fixture
def trusted_base() -> Iterator[Path]:
    """A root-owned directory under /run: every ancestor is trusted (unlike /tmp, 1777)."""
    base = Path(tempfile.mkdtemp(prefix="mp-bin-", dir="/run"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _planted(directory: Path, marker: Path) -> Path:
    """An executable named haproxy that only leaves a marker behind if anyone runs it."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    fake = directory / "haproxy"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexec sleep 300\n")
    fake.chmod(0o755)
    return fake


def test_haproxy_planted_earlier_in_path_is_never_run(short_tmp: Path, recorder: Recorder) -> None:
    """Finding 1: Neutron's `which haproxy` would have run the planted binary."""
    marker = short_tmp / "planted-ran"
    evil = _planted(short_tmp / "evil-bin", marker).parent
    env = cli.env(PATH=f"{evil}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=free_port())
    result = cli.run(*args, env=env)
    try:
        assert result.returncode == 0, result.stderr
        pid = int((short_tmp / "state" / "front.pid").read_text())
        assert os.readlink(f"/proc/{pid}/exe") == str(HAPROXY)
    finally:
        cli.run(*args, "--destroy")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        pytest.param("group-writable", "writable by group or others", id="g+w-binary"),
        pytest.param("world-writable-dir", "writable by group or others", id="o+w-dir-above"),
        pytest.param("not-root-owned", "owned by uid 65534, not root", id="foreign-owner"),
        pytest.param("dir-not-root-owned", "owned by uid 65534, not root", id="foreign-dir"),
        pytest.param("outside-allow-list", "not on the allow-list", id="outside-allow-list"),
        pytest.param("symlink-outside", "outside the allow-listed directories", id="symlink-out"),
        pytest.param("relative", "not an absolute path", id="relative"),
    ],
)
def test_untrusted_haproxy_binary_is_refused_by_the_cli(
    trusted_base: Path, short_tmp: Path, recorder: Recorder, case: str, reason: str
) -> None:
    """Finding 1: only a validated binary runs; exit non-zero naming the path and the reason."""
    marker = short_tmp / "untrusted-ran"
    bindir = trusted_base / "opt" / "bin"
    bindir.parent.mkdir(mode=0o755)
    binary = _planted(bindir, marker)
    allowed = str(bindir)
    if case == "group-writable":
        binary.chmod(0o775)
    elif case == "world-writable-dir":
        bindir.parent.chmod(0o777)
    elif case == "not-root-owned":
        os.chown(binary, NOBODY, NOBODY)
    elif case == "dir-not-root-owned":
        os.chown(bindir, NOBODY, NOBODY)
    elif case == "outside-allow-list":
        allowed = "/usr/sbin:/usr/bin"
    elif case == "symlink-outside":
        outside = _planted(trusted_base / "elsewhere", marker)
        binary.unlink()
        binary.symlink_to(outside)
    shown = "haproxy" if case == "relative" else str(binary)
    extra = ("--haproxy_binary", shown, "--allowed_binary_dirs", allowed)
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=free_port())
    result = cli.run(*args, *extra)
    assert result.returncode != 0
    assert f"refusing to run {shown}" in result.stderr
    assert reason in result.stderr
    assert not marker.exists()
    assert not (short_tmp / "state" / "front.pid").exists()


def test_trusted_copy_in_a_configured_allow_list_runs(
    trusted_base: Path, short_tmp: Path, recorder: Recorder
) -> None:
    """The allow-list is configurable: a root-owned copy in an allow-listed directory runs."""
    bindir = trusted_base / "bin"
    bindir.mkdir(mode=0o755)
    shutil.copy2(HAPROXY, bindir / "haproxy")
    extra = ("--haproxy_binary", str(bindir / "haproxy"), "--allowed_binary_dirs", str(bindir))
    with running_front("haproxy", short_tmp / "state", recorder.path, extra=extra) as front:
        assert os.readlink(f"/proc/{front.pid}/exe") == str(bindir / "haproxy")
        assert status_of(exchange(front.host, front.port, GET)) == 200


def test_config_is_0600_in_a_0700_directory(short_tmp: Path, recorder: Recorder) -> None:
    """Finding 2: even under umask 000, the config is 0600 in a 0700 directory."""
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=free_port())
    result = cli.run(*args, umask=0)
    try:
        assert result.returncode == 0, result.stderr
        conf_dir = short_tmp / "state" / "haproxy"
        [conf] = conf_dir.glob("*.conf")
        assert _mode(conf_dir) == 0o700
        assert _mode(conf) == 0o600
        assert _mode(short_tmp / "state" / "front.pid") == 0o600
    finally:
        cli.run(*args, "--destroy")


def test_symlink_planted_at_config_path_is_not_followed(
    short_tmp: Path, recorder: Recorder
) -> None:
    """Finding 2: a symlink at the config (and pidfile) path is replaced; targets unchanged."""
    victim = short_tmp / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    conf_dir = short_tmp / "state" / "haproxy"
    conf_dir.mkdir(parents=True, mode=0o700)
    (conf_dir / "network-net-1.conf").symlink_to(victim)
    (short_tmp / "state" / "front.pid").symlink_to(victim)
    with running_front("haproxy", short_tmp / "state", recorder.path) as front:
        conf = conf_dir / "network-net-1.conf"
        assert not conf.is_symlink()
        assert "frontend metadata" in conf.read_text()
        assert not front.pid_file.is_symlink()
    assert victim.read_text() == "precious\n"
    assert _mode(victim) == 0o644


def test_running_haproxy_has_only_the_minimal_environment(
    short_tmp: Path, recorder: Recorder
) -> None:
    """Finding 3: LD_PRELOAD, PYTHONPATH, proxies and secrets in the parent never reach haproxy."""
    env = cli.env(
        LD_PRELOAD="/nonexistent/libmp-preload-test.so",
        http_proxy="http://127.0.0.1:9/",
        HTTPS_PROXY="http://127.0.0.1:9/",
        METAPROXY_SHARED_SECRET="hunter2-do-not-leak",  # noqa: S106 - a decoy
    )
    assert "PYTHONPATH" in env
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=free_port())
    result = cli.run(*args, env=env)
    try:
        assert result.returncode == 0, result.stderr
        pid = int((short_tmp / "state" / "front.pid").read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = sorted(e.split(b"=", 1)[0].decode() for e in environ if e)
        assert names == ["LANG", "PATH"]
        assert b"hunter2" not in Path(f"/proc/{pid}/environ").read_bytes()
    finally:
        cli.run(*args, "--destroy")


def test_running_haproxy_inherits_no_descriptor(short_tmp: Path, recorder: Recorder) -> None:
    """Finding 3: a descriptor the parent opened without close-on-exec is not open in haproxy."""
    leak = short_tmp / "leaked-descriptor"
    fd = os.open(leak, os.O_CREAT | os.O_RDWR, 0o600)
    os.set_inheritable(fd, True)
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=free_port())
    try:
        # The CLI process holds the fd open and inheritable, as a leaky parent would.
        result = cli.run(*args, pass_fds=(fd,), close_fds=True)
        assert result.returncode == 0, result.stderr
        pid = int((short_tmp / "state" / "front.pid").read_text())
        targets = {os.readlink(p) for p in Path(f"/proc/{pid}/fd").iterdir()}
        assert str(leak) not in targets
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    finally:
        os.close(fd)
        cli.run(*args, "--destroy")


def test_stale_pidfile_naming_an_unrelated_process_is_not_killed(
    short_tmp: Path, recorder: Recorder
) -> None:
    """A bare pid is never trusted: --destroy leaves an unrelated process alone."""
    bystander = subprocess.Popen(["/bin/sleep", "300"])
    try:
        state = short_tmp / "state"
        state.mkdir()
        (state / "front.pid").write_text(f"{bystander.pid}\n")
        args = ns_proxy_args("haproxy", state, recorder.path, port=free_port())
        result = cli.run(*args, "--destroy")
        assert result.returncode == 0, result.stderr
        assert bystander.poll() is None, "the unrelated process was killed"
        assert not (state / "front.pid").exists()
    finally:
        bystander.kill()
        bystander.wait(timeout=30)


def test_destroy_reports_cleanup_failure_with_path_and_errno(
    short_tmp: Path, recorder: Recorder
) -> None:
    """Finding 4: a cleanup failure is logged with path and errno and the exit is non-zero."""
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=free_port())
    assert cli.run(*args).returncode == 0
    pid = int((short_tmp / "state" / "front.pid").read_text())
    stats = short_tmp / "state" / "haproxy" / "network-net-1.sock"
    try:
        stats.unlink()
        stats.mkdir()  # a directory in the file's place
        (stats / "x").write_text("x")
        result = cli.run(*args, "--destroy")
        assert result.returncode != 0
        assert f"cannot remove {stats}" in result.stderr
        assert "EISDIR" in result.stderr
        assert _gone(pid), "haproxy was still stopped"
        assert not (short_tmp / "state" / "front.pid").exists(), "the rest was still removed"
    finally:
        shutil.rmtree(stats, ignore_errors=True)
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_foreground_serves_until_sigterm_then_removes_everything(
    short_tmp: Path, recorder: Recorder
) -> None:
    port = free_port()
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=port)
    proc = cli.popen(*args, "--foreground")
    pidfile = short_tmp / "state" / "front.pid"
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "never served"
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        assert status_of(exchange("127.0.0.1", port, GET)) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert _gone(pid)
        assert not pidfile.exists()
        assert list((short_tmp / "state" / "haproxy").iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_foreground_reports_haproxy_dying(short_tmp: Path, recorder: Recorder) -> None:
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=free_port())
    proc = cli.popen(*args, "--foreground")
    pidfile = short_tmp / "state" / "front.pid"
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        assert "exited with status" in proc.communicate(timeout=30)[1]
        assert not pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def test_port_in_use_fails_with_haproxy_message(short_tmp: Path, recorder: Recorder) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=port)
        result = cli.run(*args)
    assert result.returncode != 0
    assert "cannot bind socket" in result.stderr
    assert not (short_tmp / "state" / "front.pid").exists()
    assert list((short_tmp / "state" / "haproxy").iterdir()) == []


def test_missing_namespace_is_a_clear_error(short_tmp: Path, recorder: Recorder) -> None:
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, netns="mp-no-such-ns")
    result = cli.run(*args)
    assert result.returncode != 0
    assert "network namespace mp-no-such-ns does not exist" in result.stderr


def test_second_start_is_refused_while_running(short_tmp: Path, recorder: Recorder) -> None:
    with running_front("haproxy", short_tmp / "state", recorder.path) as front:
        [conf] = (short_tmp / "state" / "haproxy").glob("*.conf")
        before = conf.read_text()
        again = cli.run(*front.args[:-2], "--metadata_port", str(free_port()))
        assert again.returncode != 0
        assert "already running" in again.stderr
        assert conf.read_text() == before, "the serving haproxy's config was not rewritten"
        os.kill(front.pid, 0)
        assert status_of(exchange(front.host, front.port, GET)) == 200


def _spec(short_tmp: Path, recorder: Recorder, port: int) -> FrontSpec:
    return FrontSpec(
        Identity("network", "api-1"), recorder.path, "127.0.0.1", port, short_tmp / "state"
    )


def test_check_reports_haproxys_message(short_tmp: Path, recorder: Recorder) -> None:
    """A config haproxy rejects is reported with haproxy's own words."""
    prepared = engine.prepare(_spec(short_tmp, recorder, free_port()), engine.HaproxySettings())
    prepared.files.config.write_text("frontend broken\n    bind nonsense-address:x\n")
    with pytest.raises(ProcessError) as info:
        engine.check(prepared)
    assert "[ALERT]" in str(info.value)
    assert str(prepared.files.config) in str(info.value)
    engine.cleanup(prepared.files)


def test_engine_api_start_stop_cleanup(short_tmp: Path, recorder: Recorder) -> None:
    port = free_port()
    prepared = engine.prepare(_spec(short_tmp, recorder, port), engine.HaproxySettings())
    proc = engine.start(prepared)
    try:
        assert int(prepared.files.pidfile.read_text()) == proc.pid
        assert status_of(exchange("127.0.0.1", port, GET)) == 200
    finally:
        engine.stop_process(proc, timeout=10)
        engine.cleanup(prepared.files)
    assert not prepared.files.config.exists()
    assert not prepared.files.pidfile.exists()
    assert recorder.requests[0].values("X-Neutron-Network-ID") == ["api-1"]


def test_engine_api_async_start(short_tmp: Path, recorder: Recorder) -> None:
    port = free_port()
    prepared = engine.prepare(_spec(short_tmp, recorder, port), engine.HaproxySettings())

    async def scenario() -> int:
        proc = await engine.start_async(prepared)
        try:
            status = status_of(await asyncio.to_thread(exchange, "127.0.0.1", port, GET))
        finally:
            await engine.stop_async(proc, timeout=10)
        return status

    assert asyncio.run(scenario()) == 200
    engine.cleanup(prepared.files)


def test_haproxy_drops_to_the_metadata_proxy_user(short_tmp: Path, recorder: Recorder) -> None:
    """--metadata_proxy_user/group: haproxy serves as that uid/gid (Neutron's user/group)."""
    extra = ("--metadata_proxy_user", str(NOBODY), "--metadata_proxy_group", str(NOBODY))
    short_tmp.chmod(0o711)  # the agent socket's directory must be reachable by that user
    with running_front("haproxy", short_tmp / "state", recorder.path, extra=extra) as front:
        status = Path(f"/proc/{front.pid}/status").read_text().splitlines()
        uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
        gids = next(line for line in status if line.startswith("Gid:")).split()[1:]
        assert set(uids) == {str(NOBODY)}
        assert set(gids) == {str(NOBODY)}
        assert status_of(exchange(front.host, front.port, GET)) == 200


def test_destroy_finds_haproxy_whose_pidfile_was_removed(
    short_tmp: Path, recorder: Recorder
) -> None:
    """Nothing is left behind silently: a lost pidfile does not orphan a serving haproxy."""
    args = ns_proxy_args("haproxy", short_tmp / "state", recorder.path, port=free_port())
    assert cli.run(*args).returncode == 0
    pidfile = short_tmp / "state" / "front.pid"
    pid = int(pidfile.read_text())
    try:
        pidfile.unlink()
        result = cli.run(*args, "--destroy")
        assert result.returncode == 0, result.stderr
        assert "missing or stale" in result.stderr
        assert _gone(pid)
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
