"""security/files.py: private directories, atomic private writes, and loud cleanup.

Launch-contract finding 2 (Neutron wrote the haproxy config with default permissions, through
whatever sat at the path) and finding 4 (Neutron ignored every cleanup error but ENOENT, with
no log line).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaproxy.errors import CleanupError, FileError
from metaproxy.security import files

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch directory on /run (tmpfs, supports chattr +i and bind mounts)."""
    root = "/run" if os.geteuid() == 0 else None
    path = Path(tempfile.mkdtemp(prefix="mp-files-", dir=root))
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_private_dir_is_created_0700(base: Path) -> None:
    """Finding 2: the config directory is 0700."""
    old = os.umask(0)
    try:
        made = files.ensure_private_dir(base / "a" / "haproxy")
    finally:
        os.umask(old)
    assert _mode(made) == 0o700
    assert _mode(base / "a") == 0o755, "a missing parent is not world-writable under umask 0"


def test_private_dir_of_ours_too_open_is_tightened(base: Path) -> None:
    target = base / "open"
    target.mkdir()
    target.chmod(0o777)
    files.ensure_private_dir(target)
    assert _mode(target) == 0o700


def test_private_dir_symlink_is_refused(base: Path) -> None:
    (base / "real").mkdir(mode=0o700)
    (base / "link").symlink_to(base / "real")
    with pytest.raises(FileError, match="symlink"):
        files.ensure_private_dir(base / "link")


@needs_root
def test_private_dir_foreign_owned_is_refused(base: Path) -> None:
    target = base / "theirs"
    target.mkdir(mode=0o700)
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(FileError, match="owned by uid 65534"):
        files.ensure_private_dir(target)
    assert os.stat(target).st_uid == NOBODY


def test_write_private_is_0600_whatever_the_umask(base: Path) -> None:
    """Finding 2: the file is 0600 even under a permissive umask."""
    old = os.umask(0)
    try:
        files.write_private(base / "x.conf", "hello\n")
    finally:
        os.umask(old)
    assert (base / "x.conf").read_text() == "hello\n"
    assert _mode(base / "x.conf") == 0o600
    assert os.listdir(base) == ["x.conf"], "no temporary file left behind"


def test_write_private_replaces_existing(base: Path) -> None:
    (base / "x.conf").write_text("old")
    (base / "x.conf").chmod(0o644)
    files.write_private(base / "x.conf", b"new")
    assert (base / "x.conf").read_bytes() == b"new"
    assert _mode(base / "x.conf") == 0o600


def test_write_private_does_not_follow_planted_symlink(base: Path) -> None:
    """Finding 2: a symlink planted at the path is replaced, its target is unchanged."""
    victim = base / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    (base / "x.conf").symlink_to(victim)
    files.write_private(base / "x.conf", "config\n")
    assert victim.read_text() == "precious\n"
    assert _mode(victim) == 0o644
    assert not (base / "x.conf").is_symlink()
    assert (base / "x.conf").read_text() == "config\n"


def test_write_private_over_a_directory_fails_cleanly(base: Path) -> None:
    (base / "x.conf").mkdir()
    with pytest.raises(FileError, match=r"x\.conf"):
        files.write_private(base / "x.conf", "config\n")
    assert os.listdir(base) == ["x.conf"], "the temporary file was removed"


def test_read_private_refuses_symlink(base: Path) -> None:
    (base / "real").write_text("1")
    (base / "link").symlink_to(base / "real")
    assert files.read_private(base / "real") == b"1"
    assert files.read_private(base / "missing") is None
    with pytest.raises(FileError, match="ELOOP"):
        files.read_private(base / "link")


def test_remove_missing_is_debug(base: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 4: a file that was never written is a debug line, not an error."""
    caplog.set_level(logging.DEBUG, logger="metaproxy.security.files")
    assert files.remove(base / "never") is True
    [record] = caplog.records
    assert record.levelno == logging.DEBUG
    assert str(base / "never") in record.getMessage()


def test_remove_existing(base: Path) -> None:
    (base / "f").write_text("x")
    assert files.remove(base / "f") is True
    assert not (base / "f").exists()


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[None]:
    result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"chattr +i unsupported here: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def _bind_mount(source: Path, target: Path) -> Iterator[None]:
    result = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"mount --bind not permitted: {result.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], capture_output=True, check=False)


@contextlib.contextmanager
def _as_nobody() -> Iterator[None]:
    """Drop the effective uid (root's DAC override goes with it); the real uid stays root."""
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


def _assert_error_logged(caplog: pytest.LogCaptureFixture, path: Path, errno_name: str) -> None:
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text
    message = errors[0].getMessage()
    assert str(path) in message
    assert errno_name in message


@needs_root
@pytest.mark.parametrize(
    ("case", "errno_name"),
    [
        pytest.param("permission-denied", "EACCES", id="eacces"),
        pytest.param("immutable", "EPERM", id="eperm-immutable"),
        pytest.param("directory-in-place", "EISDIR", id="eisdir"),
        pytest.param("busy-mount-point", "EBUSY", id="ebusy"),
        pytest.param("read-only-mount", "EROFS", id="erofs"),
    ],
)
def test_remove_failure_is_logged_with_path_and_errno(
    base: Path, caplog: pytest.LogCaptureFixture, case: str, errno_name: str
) -> None:
    """Finding 4: every cleanup failure is an ERROR with path and errno, and the caller knows."""
    caplog.set_level(logging.DEBUG, logger="metaproxy.security.files")
    target = base / "d" / "haproxy.conf"
    target.parent.mkdir(mode=0o755)
    target.write_text("x")
    ok: bool
    if case == "permission-denied":
        with _as_nobody():
            ok = files.remove(target)
    elif case == "immutable":
        with _immutable(target):
            ok = files.remove(target)
    elif case == "directory-in-place":
        target.unlink()
        target.mkdir()
        (target / "inner").write_text("x")
        ok = files.remove(target)
    elif case == "busy-mount-point":
        (base / "other").write_text("y")
        with _bind_mount(base / "other", target):
            ok = files.remove(target)
    else:
        with _bind_mount(target.parent, target.parent):
            remount = ["mount", "-o", "remount,ro,bind", str(target.parent)]
            subprocess.run(remount, capture_output=True, check=True)
            ok = files.remove(target)
    assert ok is False
    _assert_error_logged(caplog, target, errno_name)
    assert target.exists()


@needs_root
def test_cleanup_raises_naming_every_failed_path(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 4: cleanup tries every path and the caller gets a CleanupError naming failures."""
    bad = base / "dir-in-place"
    bad.mkdir()
    good = base / "good"
    good.write_text("x")
    with pytest.raises(CleanupError) as info:
        files.cleanup([bad, base / "missing", good, None])
    assert info.value.paths == (str(bad),)
    assert not good.exists()
