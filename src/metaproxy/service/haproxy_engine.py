"""The haproxy engine under the manager: one supervised haproxy per front.

`start` prepares the front (`haproxy.engine.prepare`: binary validated, config 0600, `haproxy
-c`), stops a haproxy a previous run may have left (trusted only by its pidfile *and* its command
line holding `-f <our config>`), then hands `start_async` to the `Supervisor`, which respawns it
when it exits. `stop` unregisters, stops (TERM, wait, KILL) and removes config, pidfile and stats
socket. Request counters come from each haproxy's read-only stats socket (`show stat`).
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import signal
import socket
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from metaproxy.config import FrontSpec
from metaproxy.errors import CleanupError
from metaproxy.haproxy import engine as hx
from metaproxy.service.fronts import FrontStats
from metaproxy.service.supervisor import Drain, Supervisor

if TYPE_CHECKING:
    from metaproxy.service.settings import Config

log = logging.getLogger(__name__)

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


class HaproxyEngine:
    kind = "haproxy"

    def __init__(self, settings: hx.HaproxySettings, supervisor: Supervisor) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self._files: dict[str, hx.FrontFiles] = {}

    @classmethod
    def from_config(cls, cfg: Config) -> HaproxyEngine:
        settings = replace(
            hx.HaproxySettings.from_mapping(cfg.section("haproxy"), {}), limits=cfg.limits
        )
        # SIGUSR1 is haproxy's soft stop: it closes its listener and exits once the requests in
        # flight are answered; SIGTERM (hard stop) follows after drain_timeout.
        drain = Drain(signal.SIGUSR1, cfg.service.drain_timeout)
        return cls(settings, Supervisor(stop_timeout=settings.stop_timeout, drain=drain))

    async def start(self, spec: FrontSpec) -> None:
        prepared = await asyncio.to_thread(hx.prepare, spec, self.settings)
        # A haproxy left by a previous run (the manager was killed): ours only if its command
        # line names our config; a reused pid or a stale pidfile after a reboot is ignored.
        if await asyncio.to_thread(hx.stop, prepared.files, self.settings.stop_timeout):
            log.warning("stopped a haproxy for %s left over from a previous run", spec.name)

        async def launch() -> asyncio.subprocess.Process:
            return await hx.start_async(prepared)

        async def cleanup() -> None:
            _cleanup(prepared.files)

        try:
            await self.supervisor.add(spec.name, launch, cleanup=cleanup)
        except BaseException:
            _cleanup(prepared.files)
            raise
        self._files[spec.name] = prepared.files

    async def stop(self, name: str) -> None:
        self._files.pop(name, None)
        await self.supervisor.remove(name)

    def stats(self, name: str) -> FrontStats:
        child = self.supervisor.children.get(name)
        files = self._files.get(name)
        if child is None or files is None:
            return FrontStats()
        stats = FrontStats(pid=child.pid, respawns=child.respawns, last_error=child.last_error)
        rows = _show_stat(files.stats)
        for row in rows:
            if row.get("svname") == "FRONTEND":
                stats.requests = _int(row.get("req_tot"))
                stats.errors = _int(row.get("ereq"))
                for cls in STATUS_CLASSES:
                    count = _int(row.get(f"hrsp_{cls}"))
                    if count:
                        stats.statuses[cls] = count
            elif row.get("svname") == "BACKEND":
                stats.errors += _int(row.get("econ")) + _int(row.get("eresp"))
        return stats

    async def close(self) -> None:
        await self.supervisor.close()
        self._files.clear()


def _cleanup(files: hx.FrontFiles) -> None:
    try:
        hx.cleanup(files)
    except CleanupError as exc:
        log.error("haproxy front files not all removed: %s", exc)


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def _show_stat(path: Path, timeout: float = 0.5) -> list[dict[str, str]]:
    """haproxy's `show stat` CSV as rows; [] when the socket does not answer in time."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        log.debug("haproxy stats socket %s: %s", path, exc)
        return []
    text = b"".join(chunks).decode("utf-8", "replace").lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))
