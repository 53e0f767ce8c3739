"""The manager behind `metaproxy up`: the host stack, its fronts, status, metrics and shutdown.

Process layout:
- The manager (this process, root): the store, the embedded metadata server and the agent (which
  holds the shared secret) on one event loop (uvloop when installed), the reconcile loop, the
  control and metrics sockets, and every listener, opened inside its namespace (setns).
- The builtin fronts run in a front worker (service/frontworkers.py, front/worker.py): a process
  forked from the zygote (service/zygote.py), which `up` forks before it reads the config, so
  the process that parses guest traffic never holds the secret; it runs unprivileged, gets its
  listeners and agent connections as file descriptors, and is respawned when it dies.
  `[front] isolate = false` keeps the fronts in this process instead.
- haproxy engine: one haproxy per front, started as a validated binary and supervised.
- Processes are forked, never our own interpreter re-executed: the launch contract only starts
  validated binaries, and a venv's python (often in a user-owned clone) is not one.
- The agent and the server stay in the manager: every number for status and metrics (agent
  lookups and cache hits, respawns) is here, and the front worker's counters come in over its
  channel. The manager itself is restarted by systemd (contrib/metaproxy.service).

Order: *start, then register* — store, metadata server, agent, fronts, then the control and
metrics sockets; shutdown runs the reverse: stop answering control/metrics, stop the fronts
(they drain in-flight requests for `drain_timeout`), then the agent, the server and the store,
and remove every socket and file made for this run, logging each failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaproxy import __version__
from metaproxy.config import FrontSpec
from metaproxy.errors import ConfigError, MetaproxyError
from metaproxy.security import files
from metaproxy.service import settings
from metaproxy.service.control import ControlServer, claim_socket_path
from metaproxy.service.fronts import FrontEngine, FrontSet
from metaproxy.service.metrics import Family, MetricsServer
from metaproxy.service.roles import Roles
from metaproxy.service.settings import Config, FrontEntry, front_entry

if TYPE_CHECKING:
    from metaproxy.agent.server import AgentServer
    from metaproxy.service.zygote import Zygote

log = logging.getLogger(__name__)

EngineFactory = Callable[[Config], FrontEngine]


def ensure_secret(cfg: Config) -> Config:
    """Generate the shared secret on first start (embedded server only) and keep it 0600."""
    if cfg.service.shared_secret:
        return cfg
    import secrets

    from metaproxy.config import Secret

    value = secrets.token_urlsafe(32)
    files.write_private(cfg.service.secret_path, value + "\n")
    log.info("generated a shared secret in %s (0600)", cfg.service.secret_path)
    return replace(cfg, service=replace(cfg.service, shared_secret=Secret(value)))


class Host:
    """Runs the stack for one Config until `stop` is set; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        *,
        engine_factory: EngineFactory | None = None,
        extra_fronts: Sequence[FrontEntry] = (),
        config_path: Path | None = None,
        environ: Mapping[str, str] | None = None,
        zygote: Zygote | None = None,
    ) -> None:
        self.cfg = cfg
        self.zygote = zygote
        self._engine_factory = engine_factory
        self.extra_fronts = tuple(extra_fronts)
        self._config_path = config_path
        self._environ = dict(environ or {})
        self.roles = Roles(cfg)
        self.fronts: FrontSet | None = None
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.started = time.time()
        self._reload = asyncio.Event()
        self.ready = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self.failure: str | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Stop the whole service because part of it cannot go on (`up` then exits 1, and
        systemd's Restart=on-failure starts it afresh)."""
        log.critical("stopping: %s", reason)
        self.failure = reason
        if self._stop is not None:
            self._stop.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Bring everything up, keep the fronts reconciled until `stop`, then tear down."""
        self._stop = stop
        try:
            await self._start()
            self.ready.set()
            log.info("metaproxy %s up: %s", __version__, self._summary())
            await self._watch(stop)
        finally:
            await self._shutdown()

    async def _start(self) -> None:
        svc = self.cfg.service
        files.ensure_private_dir(svc.state_path)
        claim_socket_path(svc.control_path)  # refuses early when another `up` runs here
        await self.roles.start()
        if self._engine_factory is not None:
            engine = self._engine_factory(self.cfg)
        else:
            engine = _default_engine(self.cfg, self.zygote, self.roles.agent, self.fail)
        self.fronts = FrontSet(engine)
        await self._reconcile()
        self.control = ControlServer(svc.control_path, self._control)
        await self.control.start()
        if svc.metrics is not None:
            self.metrics = MetricsServer(svc.metrics, self.collect)
            await self.metrics.start()

    async def _watch(self, stop: asyncio.Event) -> None:
        interval = self.cfg.service.poll_interval
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await _first(stop, self._reload)
            if stop.is_set():
                return
            if self._reload.is_set():
                self._reload.clear()
                self._reload_config()
            try:
                if self.fronts is not None:
                    await self.fronts.check_namespaces()
                await self._reconcile()
            except MetaproxyError as exc:
                # A store that cannot be read right now (locked, being migrated) must not take
                # down the fronts that serve: keep them as they are and try again next pass.
                log.error("reconciling the fronts failed; keeping them as they are: %s", exc)

    async def _shutdown(self) -> None:
        for server in (self.control, self.metrics):
            if server is not None:
                try:
                    await server.close()
                except Exception:
                    log.exception("closing %s failed", type(server).__name__)
        if self.fronts is not None:
            try:
                await self.fronts.close()
            except Exception:
                log.exception("stopping the fronts failed")
        await self.roles.stop()
        log.info("metaproxy stopped")

    # -- desired state ----------------------------------------------------------------------

    def desired(self) -> list[tuple[FrontEntry, FrontSpec]]:
        """Config entries, then demo/extra ones, then the store's; the first of a name wins."""
        entries: dict[str, FrontEntry] = {}
        for entry in (*self.cfg.fronts, *self.extra_fronts, *self._store_entries()):
            entries.setdefault(entry.name, entry)
        return [(e, e.spec(self.cfg.service, self.cfg.front)) for e in entries.values()]

    def _store_entries(self) -> list[FrontEntry]:
        out = []
        for kind, ident in self.roles.store_fronts():
            try:
                out.append(
                    front_entry(
                        kind,
                        {"id": ident},
                        where=f"store {kind}",
                        defaults=self.cfg.front,
                        source="store",
                    )
                )
            except ConfigError as exc:
                log.warning("ignoring %s %r from the store: %s", kind, ident, exc)
        return out

    async def _reconcile(self) -> None:
        if self.fronts is not None:
            await self.fronts.reconcile(self.desired())

    def request_reload(self) -> None:
        """SIGHUP: re-read the config file and apply the fronts' changes on the next pass."""
        self._reload.set()

    def _reload_config(self) -> None:
        if self._config_path is None:
            log.info("SIGHUP: no config file to re-read; reconciling with the store")
            return
        try:
            new = settings.load(self._config_path, self._environ)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running config: %s", exc)
            return
        if new.service != replace(self.cfg.service, shared_secret=new.service.shared_secret):
            log.warning("SIGHUP: [service] changes take effect only after a restart")
        if new.sections != self.cfg.sections:
            log.warning("SIGHUP: [agent]/[metadata]/[store]/[haproxy] changes need a restart")
        self.cfg = replace(self.cfg, fronts=new.fronts, front=new.front)
        log.info("SIGHUP: config re-read; %d fronts declared in it", len(new.fronts))

    # -- status and metrics -----------------------------------------------------------------

    async def _control(self, command: str) -> dict[str, Any]:
        if command == "reload":
            self.request_reload()
            return {"reloading": True}
        return self.status()

    def status(self) -> dict[str, Any]:
        svc = self.cfg.service
        return {
            "service": {
                "version": __version__,
                "pid": os.getpid(),
                "state_path": str(svc.state_path),
                "engine": svc.engine,
                "uptime": round(time.time() - self.started, 1),
                "metrics": str(svc.metrics) if svc.metrics else "off",
            },
            "fronts": self.fronts.status() if self.fronts is not None else [],
            **self.roles.status(),
        }

    def collect(self) -> list[Family]:
        """Every metric family, built from the live objects at scrape time."""
        requests = Family(
            "metaproxy_requests_total", "Requests answered by the fronts, by status.", "counter"
        )
        errors = Family("metaproxy_front_errors_total", "Front-side errors.", "counter")
        up = Family("metaproxy_front_up", "1 when the front is serving.", "gauge")
        respawns = Family(
            "metaproxy_respawns_total", "Times a supervised front process was respawned.", "counter"
        )
        fronts = self.fronts
        if fronts is not None:
            for name, front in sorted(fronts.fronts.items()):
                labels = {"network": name, "engine": fronts.engine.kind}
                up.add(1 if front.state == "running" else 0, **labels, state=front.state)
                if front.state != "running":
                    continue
                stats = fronts.engine.stats(name)
                for status, count in sorted(stats.statuses.items()):
                    requests.add(count, **labels, status=status)
                if not stats.statuses and stats.requests:
                    requests.add(stats.requests, **labels, status="all")
                errors.add(stats.errors, **labels)
                respawns.add(stats.respawns, **labels)
        return [requests, errors, up, respawns, *self.roles.metrics()]

    def _summary(self) -> str:
        fronts = self.fronts.status() if self.fronts else []
        running = sum(1 for f in fronts if f["state"] == "running")
        return (
            f"{running}/{len(fronts)} fronts serving ({self.cfg.service.engine} engine), "
            f"agent on {self.cfg.service.agent_socket}, control on {self.cfg.service.control_path}"
        )


async def _first(*events: asyncio.Event) -> None:
    """Wait until any of `events` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _default_engine(
    cfg: Config, zygote: Zygote | None, agent: AgentServer | None, fail: Callable[[str], None]
) -> FrontEngine:
    from metaproxy.service import engines

    accept = agent.accept if agent else None
    return engines.create(cfg, zygote=zygote, accept=accept, fail=fail)
