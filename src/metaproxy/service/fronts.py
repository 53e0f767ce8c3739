"""The set of fronts the manager runs, kept equal to the desired set by diff.

`FrontSet.reconcile(desired)` compares the desired entries with what runs and starts, stops or
restarts only the fronts that differ; a front whose start fails is kept as `failed` and retried
on a later pass, without touching the others. `check_namespaces` notices a namespace deleted
(or replaced) under a running front by comparing the inode of /run/netns/NAME with the one
recorded when the front started, stops that front and reports it.

Engines are behind the small `FrontEngine` protocol (service/engines.py adapts the builtin and
haproxy engines), so the reconcile logic is tested with a fake engine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from metaproxy.config import FrontSpec
from metaproxy.errors import MetaproxyError
from metaproxy.service.settings import FrontEntry

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
FrontState = Literal["running", "failed", "netns-gone", "stopped"]
RETRY_AFTER = 5.0  # seconds between attempts to start a failed front


@dataclass(slots=True)
class FrontStats:
    """What an engine knows about one front, for status and metrics."""

    pid: int | None = None
    requests: int = 0
    errors: int = 0
    last_error: str = ""
    respawns: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # "200" → count


class FrontEngine(Protocol):
    """What the manager needs from an engine: start/stop one front by name, and its numbers."""

    kind: str

    async def start(self, spec: FrontSpec) -> None: ...

    async def stop(self, name: str) -> None: ...

    def stats(self, name: str) -> FrontStats: ...

    async def close(self) -> None: ...


def netns_inode(name: str, root: Path = NETNS_DIR) -> tuple[int, int] | None:
    """(device, inode) of the namespace mounted at /run/netns/NAME, or None when it is gone."""
    try:
        st = os.stat(root / name)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@dataclass(slots=True)
class Front:
    entry: FrontEntry
    spec: FrontSpec
    state: FrontState = "stopped"
    last_error: str = ""
    inode: tuple[int, int] | None = None
    changed_at: float = 0.0


class FrontSet:
    """The running fronts of one engine, keyed by name (`network-<id>` / `router-<id>`)."""

    def __init__(self, engine: FrontEngine, *, netns_root: Path = NETNS_DIR) -> None:
        self.engine = engine
        self.fronts: dict[str, Front] = {}
        self._netns_root = netns_root

    async def reconcile(self, desired: Iterable[tuple[FrontEntry, FrontSpec]]) -> None:
        """Start, stop or restart just the fronts that differ from `desired`."""
        wanted = {entry.name: (entry, spec) for entry, spec in desired}
        for name in [n for n in self.fronts if n not in wanted]:
            log.info("front %s is no longer wanted; stopping it", name)
            await self._stop(self.fronts.pop(name))
        now = time.monotonic()
        for name, (entry, spec) in wanted.items():
            front = self.fronts.get(name)
            if front is not None and front.spec == spec:
                if front.state == "running" or now - front.changed_at < RETRY_AFTER:
                    continue
            elif front is not None:
                log.info("front %s changed; restarting it", name)
                await self._stop(front)
            front = self.fronts[name] = Front(entry, spec, changed_at=now)
            await self._start(front)

    async def _start(self, front: Front) -> None:
        front.changed_at = time.monotonic()
        netns = front.spec.netns
        inode = netns_inode(netns, self._netns_root) if netns else None
        if netns and inode is None:
            if front.state != "netns-gone" or not front.last_error:
                log.error(
                    "front %s: namespace %s does not exist; not starting it",
                    front.entry.name,
                    netns,
                )
            front.state, front.last_error = "netns-gone", f"namespace {netns} does not exist"
            return
        try:
            await self.engine.start(front.spec)
        except MetaproxyError as exc:
            front.state, front.last_error = "failed", str(exc)
            log.error("front %s failed to start: %s", front.entry.name, exc)
            return
        except Exception as exc:
            # An engine bug for one network must not stop the manager serving the others.
            front.state, front.last_error = "failed", f"unexpected error: {exc!r}"
            log.exception("front %s failed to start", front.entry.name)
            return
        front.state, front.last_error, front.inode = "running", "", inode
        log.info(
            "front %s serving %s:%d%s (%s engine)",
            front.entry.name,
            front.spec.bind_address,
            front.spec.port,
            f" in namespace {netns}" if netns else "",
            self.engine.kind,
        )

    async def _stop(self, front: Front) -> None:
        if front.state != "running":
            return
        try:
            await self.engine.stop(front.entry.name)
        except MetaproxyError as exc:
            log.error("stopping front %s failed: %s", front.entry.name, exc)
            front.last_error = f"stop failed: {exc}"
        front.state = "stopped"

    async def check_namespaces(self) -> list[str]:
        """Stop fronts whose namespace vanished or was replaced; return their names."""
        gone: list[str] = []
        for front in self.fronts.values():
            netns = front.spec.netns
            if front.state != "running" or not netns:
                continue
            inode = netns_inode(netns, self._netns_root)
            if inode == front.inode:
                continue
            what = "was deleted" if inode is None else "was replaced by another namespace"
            log.error(
                "front %s: namespace %s %s under it; stopping the front (the others keep serving)",
                front.entry.name,
                netns,
                what,
            )
            await self._stop(front)
            front.state = "netns-gone"
            front.last_error = f"namespace {netns} {what}"
            front.changed_at = time.monotonic()
            gone.append(front.entry.name)
            if inode is not None:
                # A new namespace of the same name: serve it at once, not after RETRY_AFTER.
                await self._start(front)
        return gone

    async def close(self) -> None:
        """Stop every front at once through the engine: all listeners stop accepting first, then
        requests in flight get the engine's drain time, then connections and processes go."""
        try:
            await self.engine.close()
        finally:
            for front in self.fronts.values():
                front.state = "stopped"
            self.fronts.clear()

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for name, front in sorted(self.fronts.items()):
            stats = self.engine.stats(name) if front.state == "running" else FrontStats()
            rows.append(
                {
                    "name": name,
                    "kind": front.entry.identity.kind,
                    "id": front.entry.identity.id,
                    "netns": front.spec.netns or "",
                    "address": f"{front.spec.bind_address}:{front.spec.port}",
                    "engine": self.engine.kind,
                    "source": front.entry.source,
                    "pid": stats.pid,
                    "state": front.state,
                    "requests": stats.requests,
                    "errors": stats.errors,
                    "respawns": stats.respawns,
                    "last_error": front.last_error or stats.last_error,
                }
            )
        return rows
