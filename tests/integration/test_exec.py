"""security/exec.py: which binaries may run, and what a started program inherits.

Launch-contract finding 1 (Neutron found haproxy with `which` and ran whatever the path held)
and finding 3 (Neutron `os.execl`'d it with the caller's whole environment and open files).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaproxy.errors import ProcessError, UntrustedBinary
from metaproxy.security import exec as sexec

NOBODY = 65534
TRUE = "/usr/bin/true"


@pytest.fixture
def trusted_base() -> Iterator[Path]:
    """A root-owned 0755 directory whose ancestors are all trusted (/run), unlike /tmp (1777)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: trusted fixtures must be root-owned")
    base = Path(tempfile.mkdtemp(prefix="mp-exec-", dir="/run"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _install(directory: Path, name: str = "haproxy", mode: int = 0o755) -> Path:
    directory.mkdir(mode=0o755, exist_ok=True)
    directory.chmod(0o755)
    target = directory / name
    shutil.copy(TRUE, target)
    target.chmod(mode)
    return target


def test_default_haproxy_validates() -> None:
    if not os.path.exists("/usr/sbin/haproxy"):
        pytest.skip("haproxy is not installed (CI installs it)")
    assert sexec.validate_binary("/usr/sbin/haproxy") == Path("/usr/sbin/haproxy")


def test_trusted_copy_validates(trusted_base: Path) -> None:
    binary = _install(trusted_base / "bin")
    assert sexec.validate_binary(binary, [trusted_base / "bin"]) == binary


def test_symlink_inside_allow_list_validates(trusted_base: Path) -> None:
    real = _install(trusted_base / "real")
    (trusted_base / "bin").mkdir(mode=0o755)
    (trusted_base / "bin" / "haproxy").symlink_to(real)
    allowed = [trusted_base / "bin", trusted_base / "real"]
    assert sexec.validate_binary(trusted_base / "bin" / "haproxy", allowed) == real


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        pytest.param("group-writable-binary", "writable by group or others", id="g+w-binary"),
        pytest.param("world-writable-binary", "writable by group or others", id="o+w-binary"),
        pytest.param("foreign-binary", "owned by uid 65534, not root", id="foreign-binary"),
        pytest.param("group-writable-dir", "writable by group or others", id="g+w-dir"),
        pytest.param("world-writable-parent", "writable by group or others", id="o+w-parent"),
        pytest.param("foreign-parent", "owned by uid 65534, not root", id="foreign-parent"),
        pytest.param("symlink-outside", "outside the allow-listed directories", id="symlink-out"),
        pytest.param("link-via-open-dir", "writable by group or others", id="link-via-open-dir"),
        pytest.param("not-in-allow-list", "not on the allow-list", id="not-allowed"),
        pytest.param("directory", "is not a regular file", id="directory"),
        pytest.param("not-executable", "is not executable", id="not-executable"),
        pytest.param("missing", "cannot stat", id="missing"),
    ],
)
def test_untrusted_binary_is_refused(trusted_base: Path, setup: str, reason: str) -> None:
    """Finding 1: only a validated binary runs; the error names the path and the reason."""
    bindir = trusted_base / "sub" / "bin"
    bindir.parent.mkdir(mode=0o755)
    binary = _install(bindir)
    allowed: list[Path] = [bindir]
    if setup == "group-writable-binary":
        binary.chmod(0o775)
    elif setup == "world-writable-binary":
        binary.chmod(0o757)
    elif setup == "foreign-binary":
        os.chown(binary, NOBODY, NOBODY)
    elif setup == "group-writable-dir":
        bindir.chmod(0o775)
    elif setup == "world-writable-parent":
        bindir.parent.chmod(0o1777)
    elif setup == "foreign-parent":
        os.chown(bindir.parent, NOBODY, NOBODY)
    elif setup == "symlink-outside":
        outside = _install(trusted_base / "outside")
        binary.unlink()
        binary.symlink_to(outside)
    elif setup == "link-via-open-dir":
        # bin/haproxy → open/hop → real/haproxy: both ends trusted, but anyone can retarget hop.
        real = _install(trusted_base / "real")
        hop_dir = trusted_base / "open"
        hop_dir.mkdir()
        hop_dir.chmod(0o777)
        (hop_dir / "hop").symlink_to(real)
        binary.unlink()
        binary.symlink_to(hop_dir / "hop")
        allowed = [bindir, trusted_base / "real"]
    elif setup == "not-in-allow-list":
        allowed = [trusted_base / "elsewhere"]
    elif setup == "directory":
        binary.unlink()
        binary.mkdir()
    elif setup == "not-executable":
        binary.chmod(0o644)
    elif setup == "missing":
        binary.unlink()
    with pytest.raises(UntrustedBinary) as info:
        sexec.validate_binary(binary, allowed)
    assert info.value.path == str(binary)
    assert reason in info.value.reason
    assert str(binary) in str(info.value)


def test_relative_name_is_never_looked_up() -> None:
    """Finding 1: a bare name is refused, never resolved through $PATH like `which` did."""
    with pytest.raises(UntrustedBinary, match="not an absolute path"):
        sexec.validate_binary("haproxy")


def test_binary_in_tmp_is_refused_by_default() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        binary = _install(Path(tmp))
        with pytest.raises(UntrustedBinary, match="not on the allow-list"):
            sexec.validate_binary(binary)


def test_find_binary_takes_first_valid(trusted_base: Path) -> None:
    good = _install(trusted_base / "b")
    missing = trusted_base / "a" / "haproxy"
    assert sexec.find_binary([missing, good], [trusted_base / "a", trusted_base / "b"]) == good


def test_find_binary_raises_when_none_exists(trusted_base: Path) -> None:
    with pytest.raises(UntrustedBinary, match="no such file"):
        sexec.find_binary([trusted_base / "nope"], [trusted_base])


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("LD_PRELOAD", id="ld-preload"),
        pytest.param("LD_LIBRARY_PATH", id="ld-library-path"),
        pytest.param("PYTHONPATH", id="pythonpath"),
        pytest.param("http_proxy", id="http-proxy"),
        pytest.param("HTTPS_PROXY", id="https-proxy-upper"),
        pytest.param("METADATA_SHARED_SECRET", id="secret"),
        pytest.param("DB_PASSWORD", id="password"),
        pytest.param("BAD NAME", id="bad-name"),
    ],
)
def test_minimal_env_refuses_dangerous_extras(name: str) -> None:
    with pytest.raises(ProcessError, match="refusing to pass"):
        sexec.minimal_env({name: "x"})


def test_minimal_env_is_minimal() -> None:
    assert sexec.minimal_env() == {"PATH": sexec.SAFE_PATH, "LANG": "C.UTF-8"}
    assert sexec.minimal_env({"TZ": "UTC"})["TZ"] == "UTC"


POLLUTED = {
    "LD_PRELOAD": "/nonexistent/libmp-evil.so",
    "PYTHONPATH": "/nonexistent/py",
    "http_proxy": "http://127.0.0.1:9/",
    "METAPROXY_SHARED_SECRET": "hunter2",
}


def test_spawned_child_sees_only_minimal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 3: the parent's LD_PRELOAD, PYTHONPATH, proxy and secret never reach a child."""
    for key, value in POLLUTED.items():
        monkeypatch.setenv(key, value)
    proc = sexec.spawn(["/usr/bin/env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=30)
    lines = sorted(out.decode().splitlines())
    assert lines == sorted(f"{k}={v}" for k, v in sexec.minimal_env().items())


def test_spawned_child_inherits_no_descriptor() -> None:
    """Finding 3: a descriptor the parent made inheritable is still not open in the child."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, True)
    os.set_inheritable(write_fd, True)
    try:
        proc = sexec.spawn(["/bin/ls", "/proc/self/fd"], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    fds = {int(x) for x in out.split()}
    # 0, 1, 2 and ls's own directory handle; never the parent's pipe.
    assert read_fd not in fds
    assert write_fd not in fds
    assert len(fds) <= 4


def test_spawned_child_stdin_is_devnull() -> None:
    proc = sexec.spawn(["/usr/bin/readlink", "/proc/self/fd/0"], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == b"/dev/null"


def test_spawn_refuses_relative_argv0() -> None:
    with pytest.raises(UntrustedBinary):
        sexec.spawn(["env"])


async def test_spawn_async_has_the_same_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in POLLUTED.items():
        monkeypatch.setenv(key, value)
    proc = await sexec.spawn_async(["/usr/bin/env"], stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert sorted(out.decode().splitlines()) == sorted(
        f"{k}={v}" for k, v in sexec.minimal_env().items()
    )


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_spawn_async_sets_the_umask_on_either_loop(loop_kind: str) -> None:
    """`metaproxy up` runs on uvloop, whose subprocess_exec has no `umask` argument."""

    async def child_umask() -> bytes:
        proc = await sexec.spawn_async(["/bin/sh", "-c", "umask"], stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        return out.strip()

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        assert uvloop.run(child_umask()) == b"0077"
    else:
        assert asyncio.run(child_umask()) == b"0077"


def test_run_reports_output_of_failure() -> None:
    with pytest.raises(ProcessError, match="exited with status 1") as info:
        sexec.run(["/bin/sh", "-c", "echo boom; exit 1"], timeout=30)
    assert "boom" in info.value.stderr
    assert info.value.returncode == 1


def test_parse_allowed_dirs() -> None:
    assert sexec.parse_allowed_dirs("/a:/b,/c") == (Path("/a"), Path("/b"), Path("/c"))
    with pytest.raises(UntrustedBinary, match="absolute"):
        sexec.parse_allowed_dirs("rel/dir")


def test_spawn_async_under_uvloop_has_the_same_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """`metaproxy up` runs on uvloop: its child gets the same env, no fds, /dev/null, umask."""
    uvloop = pytest.importorskip("uvloop")
    for key, value in POLLUTED.items():
        monkeypatch.setenv(key, value)
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, True)

    async def child(argv: list[str]) -> bytes:
        proc = await sexec.spawn_async(argv, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        return out

    script = "umask; readlink /proc/self/fd/0; ls /proc/self/fd; env"
    try:
        out = uvloop.run(child(["/bin/sh", "-c", script])).decode().splitlines()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert out[0] == "0077"
    assert out[1] == "/dev/null"
    env_lines = [line for line in out if "=" in line]
    assert sorted(n.split("=", 1)[0] for n in env_lines if not n.startswith("PWD=")) == [
        "LANG",
        "PATH",
    ]
    fds = {int(x) for x in out[2:] if x.isdigit()}
    assert fds <= {0, 1, 2, 3}, "0-2 and ls's own directory handle only"
