"""The running service's control socket, and the client `metaproxy status` uses.

The socket lives in the state directory (0700) and is itself 0600: only its owner (root in a
deployment) can ask. One request per connection: a JSON line `{"command": "status"}` in, one
JSON document out. Commands: `status` (fronts, agent, server) and `reload` (SIGHUP's job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from metaproxy.errors import ConfigError, MetaproxyError

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[dict[str, Any]]]
MAX_REQUEST = 4096
COMMANDS = ("status", "reload")


def claim_socket_path(path: Path) -> None:
    """Make `path` free for a new socket: remove a stale one, refuse a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it", key="path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise ConfigError(f"cannot probe {path}: {exc.strerror}", key="path") from exc
    finally:
        probe.close()
    raise ConfigError(
        f"{path} is in use: another metaproxy is already running with this state path",
        key="service.state_path",
    )


class ControlServer:
    """Serve control requests on a 0600 Unix socket until `close`."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        claim_socket_path(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        # The directory is 0700, so nobody else can reach the socket before this chmod.
        os.chmod(self.path, 0o600)
        log.info("control socket at %s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                line = await reader.readline()
                reply = await self._answer(line[:MAX_REQUEST])
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (TimeoutError, OSError) as exc:
            log.debug("control client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line or b"{}")
            command = request.get("command") if isinstance(request, dict) else None
        except ValueError:
            command = None
        if command not in COMMANDS:
            return {"ok": False, "error": f"unknown command; expected one of {', '.join(COMMANDS)}"}
        try:
            return {"ok": True, **await self._handler(str(command))}
        except MetaproxyError as exc:
            return {"ok": False, "error": str(exc)}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        from metaproxy.security import files

        files.remove(self.path)


def request(path: Path, command: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the running service; a missing or dead socket is a clear MetaproxyError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError):
        raise MetaproxyError(
            f"metaproxy is not running (no service answers on {path}); start it with "
            "'metaproxy up', or pass the same --config"
        ) from None
    except PermissionError:
        raise MetaproxyError(
            f"permission denied on {path}: run as the service's user (root)"
        ) from None
    except OSError as exc:
        raise MetaproxyError(f"cannot talk to the service on {path}: {exc}") from exc
    finally:
        sock.close()
    try:
        reply: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise MetaproxyError(f"the service on {path} answered garbage") from exc
    if not reply.get("ok"):
        raise MetaproxyError(f"the service refused: {reply.get('error', 'no reason given')}")
    return reply
