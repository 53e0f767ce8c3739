"""The host's in-process roles: the store, the embedded metadata server and the agent.

Each role builds its own config slice from its table (`AgentConfig.from_mapping`, ...); this
module only injects what the host decides for all of them — the sockets under the state path
and the shared secret — unless the operator's table already set it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from metaproxy.config import IdentityKind
from metaproxy.metadata.records import PortMatch
from metaproxy.service.metrics import Family, Histogram

if TYPE_CHECKING:
    from metaproxy.agent.config import AgentConfig
    from metaproxy.agent.server import AgentServer
    from metaproxy.agent.upstream import Upstream
    from metaproxy.metadata.server import MetadataServer
    from metaproxy.metadata.store import SqliteStore
    from metaproxy.service.settings import Config

log = logging.getLogger(__name__)


# agent.pipeline when the agent talks to the embedded metadata server (see agent/client.py).
EMBEDDED_PIPELINE = 16


class Roles:
    """Start order: store → metadata server → agent; `stop` runs the reverse and never raises."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.store: SqliteStore | None = None
        self.server: MetadataServer | None = None
        self.agent: AgentServer | None = None
        self._fronts_cache: tuple[object, list[tuple[IdentityKind, str]]] = (None, [])
        self.latency: dict[str, Histogram] = {}  # network id → agent → server latency

    # -- config slices ------------------------------------------------------------------------

    def agent_table(self) -> dict[str, Any]:
        svc = self.cfg.service
        table = self.cfg.section("agent")
        table.setdefault("socket", str(svc.agent_socket))
        if not any(k in table for k in ("metadata_url", "metadata_host", "nova_metadata_host")):
            table["metadata_url"] = svc.metadata_url or f"unix:{svc.metadata_socket}"
            if svc.metadata_url is None:
                # Our own server answers pipelined requests in order: let GETs share connections.
                table.setdefault("pipeline", EMBEDDED_PIPELINE)
        if not any("shared_secret" in k for k in table):
            table["shared_secret"] = svc.shared_secret.reveal()
        return table

    def store_table(self) -> dict[str, Any]:
        table = self.cfg.section("store")
        table.setdefault("path", str(self.cfg.service.store_path))
        return table

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        from metaproxy.agent.config import AgentConfig
        from metaproxy.agent.server import AgentServer
        from metaproxy.metadata.config import StoreConfig
        from metaproxy.metadata.store import open_store

        store_cfg = StoreConfig.from_mapping(self.store_table(), {})
        store = self.store = open_store(store_cfg.path)
        if self.cfg.service.metadata_url is None:
            await self._start_server(store)
        agent_cfg = AgentConfig.from_mapping(self.agent_table(), {})
        if agent_cfg.workers > 1:
            log.warning(
                "agent.workers = %d is for 'metaproxy agent' on its own; under 'metaproxy up' the "
                "agent runs in the service's process",
                agent_cfg.workers,
            )
        agent = AgentServer(agent_cfg, self.store)
        agent.upstream = _timed_upstream(agent_cfg, self.latency)
        await agent.start()
        self.agent = agent

    async def _start_server(self, store: SqliteStore) -> None:
        from metaproxy.metadata.config import MetadataConfig
        from metaproxy.metadata.server import MetadataServer

        svc = self.cfg.service
        config = MetadataConfig.from_mapping(
            self.cfg.section("metadata"),
            {},
            secret=svc.shared_secret,
            listen=f"unix:{svc.metadata_socket}",
        )
        server = MetadataServer(config, store)
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.agent is not None:
            try:
                await self.agent.stop()
            except Exception:
                log.exception("stopping the agent failed")
            self.agent = None
        if self.server is not None:
            try:
                await self.server.stop()
            except Exception:
                log.exception("stopping the metadata server failed")
            self.server = None
        if self.store is not None:
            try:
                self.store.close()
            except Exception:
                log.exception("closing the store failed")
            self.store = None

    # -- what the manager asks ----------------------------------------------------------------

    def store_version(self) -> object:
        return self.store.data_version() if self.store is not None else None

    def store_fronts(self) -> list[tuple[IdentityKind, str]]:
        """Networks and routers in the store; re-read only when the store changed."""
        if self.store is None:
            return []
        version = self.store.data_version()
        if self._fronts_cache[0] != version:
            fronts: list[tuple[IdentityKind, str]] = [
                ("network", n.id) for n in self.store.networks()
            ]
            fronts += [("router", r.id) for r in self.store.routers()]
            self._fronts_cache = (version, fronts)
        return list(self._fronts_cache[1])

    def status(self) -> dict[str, Any]:
        svc = self.cfg.service
        agent: dict[str, Any] = {"state": "stopped"}
        if self.agent is not None:
            registry = self.agent.registry
            agent = {
                "state": "running",
                "socket": str(self.agent.socket_path),
                "upstream": self.agent.config.upstream.url,
                "responses": {str(k): v for k, v in sorted(self.agent.statuses.items())},
                "lookups": getattr(registry, "lookups", None),
                "cache_hits": getattr(registry, "hits", None),
            }
        if svc.metadata_url is not None:
            server: dict[str, Any] = {"state": "external", "url": svc.metadata_url}
        elif self.server is not None:
            server = {"state": "running", "listen": f"unix:{svc.metadata_socket}"}
        else:
            server = {"state": "stopped"}
        return {"agent": agent, "server": server}

    def metrics(self) -> list[Family]:
        lookups = Family("metaproxy_agent_lookups_total", "Store lookups by the agent.", "counter")
        hits = Family(
            "metaproxy_agent_cache_hits_total", "Lookups answered by the cache.", "counter"
        )
        responses = Family(
            "metaproxy_agent_responses_total", "Agent answers to fronts, by status.", "counter"
        )
        if self.agent is not None:
            lookups.add(getattr(self.agent.registry, "lookups", 0))
            hits.add(getattr(self.agent.registry, "hits", 0))
            for status, count in sorted(self.agent.statuses.items()):
                responses.add(count, status=str(status))
        latency = Family(
            "metaproxy_upstream_latency_seconds",
            "Time the metadata server (embedded or Nova) took to answer the agent, by network.",
            "histogram",
        )
        for network, hist in sorted(self.latency.items()):
            hist.export(latency, network=network)
        return [lookups, hits, responses, latency]


def open_configured_store(cfg: Config) -> SqliteStore:
    """Open the store `cfg` names (another connection: the demo and tests add records with it)."""
    from metaproxy.metadata.config import StoreConfig
    from metaproxy.metadata.store import open_store

    return open_store(StoreConfig.from_mapping(Roles(cfg).store_table(), {}).path)


def _timed_upstream(cfg: AgentConfig, latency: dict[str, Histogram]) -> Upstream:
    """The agent's upstream client, observing each answer's latency per network."""
    from metaproxy.agent.upstream import Upstream

    def observe(match: PortMatch, seconds: float) -> None:
        hist = latency.get(match.network_id)
        if hist is None:
            hist = latency[match.network_id] = Histogram()
        hist.observe(seconds)

    return Upstream(cfg.upstream, cfg.shared_secret, observe=observe)
