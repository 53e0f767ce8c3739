"""The agent's listening Unix socket: in a directory we own, mode and backlog really applied."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from metaproxy.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Listener:
    """A listening socket and the file node it was bound to; `close` removes only that node."""

    sock: socket.socket
    path: Path
    inode: tuple[int, int]

    def close(self) -> None:
        self.sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) != self.inode:
                log.info("not removing %s: another process replaced it", self.path)
                return
            os.unlink(self.path)
        except FileNotFoundError:
            log.debug("socket %s already gone", self.path)
        except OSError as exc:
            log.error("cannot remove socket %s: %s (errno %d)", self.path, exc.strerror, exc.errno)


def bind_unix(path: Path, *, mode: int, backlog: int, group: int | None = None) -> Listener:
    """A listening socket at `path` with permission bits `mode`; the caller must `close` it.

    Order matters: bind, chmod (and chown to `group`), and only then listen. Until listen()
    every connect() is refused, so no client ever reaches the socket while its mode is still
    the umask's. A stale socket is replaced; a live agent at `path`, or a `path` that is not a
    socket, is a ConfigError.
    """
    _check_directory(path.parent)
    if _check_existing(path):
        _unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        try:
            # umask is process-wide (and other threads may create files): chmod the node instead.
            os.chmod(path, mode)
            if group is not None:
                os.chown(path, -1, group, follow_symlinks=False)
            st = os.lstat(path)
            sock.listen(backlog)
        except BaseException:
            _unlink(path)
            raise
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"agent.socket: cannot listen on {path}: {exc.strerror}", key="agent.socket"
        ) from exc
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return Listener(sock, path, (st.st_dev, st.st_ino))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _check_directory(directory: Path) -> None:
    """Create the socket's directory (0755) or check that an existing one is safely ours."""
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = os.stat(directory)
    except OSError as exc:
        raise ConfigError(
            f"agent.socket: cannot create directory {directory}: {exc.strerror}",
            key="agent.socket",
        ) from exc
    # Another user who can write there could swap our socket for theirs between bind and use.
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"agent.socket: directory {directory} belongs to uid {st.st_uid}, not to us",
            key="agent.socket",
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"agent.socket: directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o})",
            key="agent.socket",
        )


def _check_existing(path: Path) -> bool:
    """False for a missing path, True for a stale socket (to replace); refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"agent.socket: {path} exists and is not a socket; refusing to replace it",
            key="agent.socket",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("replacing stale socket %s", path)
            return True
        raise ConfigError(
            f"agent.socket: cannot probe existing socket {path}: {exc.strerror}",
            key="agent.socket",
        ) from exc
    finally:
        probe.close()
    raise ConfigError(
        f"agent.socket: {path} is in use by a running process (another agent?)",
        key="agent.socket",
    )
