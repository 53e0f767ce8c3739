"""The one place sensitive files are written and removed: 0600 in 0700, atomic, no symlinks.

- `ensure_private_dir`: a 0700 directory owned by us; a symlink or a directory someone else owns
  is refused, one of ours that is too open is tightened (with a warning).
- `write_private`: temporary file in the same directory (O_EXCL|O_NOFOLLOW, 0600), fsync,
  rename over the final name, fsync the directory. A symlink planted at the final path is
  replaced, never followed: its target stays untouched (Neutron wrote haproxy configs with
  default permissions through whatever sat at the path).
- `remove` / `cleanup`: a missing file is logged at debug (it was never written); every other
  failure is logged at ERROR with the path and the errno name (Neutron swallowed them all), and
  the caller learns it failed: `remove` returns False, `cleanup` raises CleanupError.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from metaproxy.errors import CleanupError, FileError

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _fail(path: str | os.PathLike[str], what: str, exc: OSError) -> FileError:
    name = _errno_name(exc)
    return FileError(
        f"cannot {what} {os.fspath(path)}: {exc.strerror} ({name})",
        path=os.fspath(path),
        errno_name=name,
    )


def _make_parents(directory: Path) -> None:
    """Create missing ancestors 0755 (Path.mkdir(parents=True) would make them 0777 & ~umask:
    world-writable under umask 0, letting anyone swap our private directory out)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for each in reversed(missing):
        try:
            os.mkdir(each, 0o755)
        except FileExistsError:
            pass


def ensure_private_dir(path: str | os.PathLike[str], *, mode: int = PRIVATE_DIR_MODE) -> Path:
    """Create `path` as a private directory (parents 0755 if missing), or check and tighten it."""
    target = Path(path)
    try:
        _make_parents(target.parent)
        os.mkdir(target, mode)
    except FileExistsError:
        pass
    except OSError as exc:
        raise _fail(target, "create directory", exc) from exc
    try:
        lst = os.lstat(target)
    except OSError as exc:
        raise _fail(target, "inspect", exc) from exc
    if stat.S_ISLNK(lst.st_mode):
        raise FileError(f"refusing {target}: it is a symlink, not a directory", path=str(target))
    if not stat.S_ISDIR(lst.st_mode):
        raise FileError(f"refusing {target}: it is not a directory", path=str(target))
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail(target, "open directory", exc) from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise FileError(
                f"refusing {target}: owned by uid {st.st_uid}, not by us (uid {os.geteuid()})",
                path=str(target),
            )
        current = stat.S_IMODE(st.st_mode)
        if current != mode:
            log.warning("tightening %s from mode %o to %o", target, current, mode)
            os.fchmod(fd, mode)
    except OSError as exc:
        raise _fail(target, "secure directory", exc) from exc
    finally:
        os.close(fd)
    return target


def write_private(
    path: str | os.PathLike[str], data: bytes | str, *, mode: int = PRIVATE_FILE_MODE
) -> Path:
    """Atomically replace `path` with `data`, mode 0600, never following a symlink at `path`."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp_name = f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail(target.parent, "open directory", exc) from exc
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp_name, flags, mode, dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # rename(2) replaces whatever directory entry is at the name, a symlink included.
        os.rename(tmp_name, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as exc:
        try:
            os.unlink(tmp_name, dir_fd=dir_fd)
        except OSError:
            pass
        raise _fail(target, "write", exc) from exc
    finally:
        os.close(dir_fd)
    return target


def read_private(path: str | os.PathLike[str], *, limit: int = 65536) -> bytes | None:
    """Read a small file without following a symlink; None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _fail(path, "read", exc) from exc
    try:
        with os.fdopen(fd, "rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        raise _fail(path, "read", exc) from exc


def remove(path: str | os.PathLike[str]) -> bool:
    """Unlink a file we made; True when it is gone (or never was), False (logged) otherwise."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        log.debug("not removing %s: it does not exist (never written)", os.fspath(path))
        return True
    except OSError as exc:
        log.error("cannot remove %s: %s (%s)", os.fspath(path), exc.strerror, _errno_name(exc))
        return False
    log.debug("removed %s", os.fspath(path))
    return True


def remove_dir(path: str | os.PathLike[str]) -> bool:
    """rmdir an (empty) directory we made; same logging and result as `remove`."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        log.debug("not removing directory %s: it does not exist", os.fspath(path))
        return True
    except OSError as exc:
        log.error(
            "cannot remove directory %s: %s (%s)", os.fspath(path), exc.strerror, _errno_name(exc)
        )
        return False
    return True


def cleanup(paths: Iterable[str | os.PathLike[str] | None]) -> None:
    """Remove every path (all are tried); raise CleanupError naming those that failed."""
    failed = [os.fspath(p) for p in paths if p is not None and not remove(p)]
    if failed:
        raise CleanupError(f"could not remove {', '.join(failed)} (see log)", paths=failed)
