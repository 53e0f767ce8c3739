"""Adapters from the two front engines to the manager's `FrontEngine` protocol.

- builtin: every front is a listener in this process (`front.builtin.BuiltinFront`); a listener
  is added and removed without touching the others.
- haproxy: every front is one haproxy, prepared (rendered, written 0600, `haproxy -c`) by
  `haproxy.engine` and run in the foreground under the `Supervisor`, which respawns it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from metaproxy.config import FrontSpec
from metaproxy.service.fronts import FrontEngine, FrontStats

if TYPE_CHECKING:
    from metaproxy.front.builtin import BuiltinFront
    from metaproxy.service.frontworkers import Accept
    from metaproxy.service.settings import Config
    from metaproxy.service.zygote import Zygote

log = logging.getLogger(__name__)


class BuiltinEngine:
    """All fronts as listeners of one `BuiltinFront` in the running loop."""

    kind = "builtin"

    def __init__(self, front: BuiltinFront, *, drain: float = 0.0) -> None:
        self.front = front
        self.drain = drain

    async def start(self, spec: FrontSpec) -> None:
        await self.front.add(spec)

    async def stop(self, name: str) -> None:
        if name in self.front:
            await self.front.remove(name)

    def stats(self, name: str) -> FrontStats:
        try:
            raw = self.front.stats(name)
        except KeyError:
            return FrontStats()
        import os

        return FrontStats(
            pid=os.getpid(),
            requests=raw.requests,
            errors=raw.errors,
            last_error=raw.last_error or "",
            statuses={str(k): v for k, v in raw.statuses.items()},
        )

    async def close(self) -> None:
        await self.front.close(drain=self.drain)


def create(
    cfg: Config,
    *,
    zygote: Zygote | None = None,
    accept: Accept | None = None,
    fail: Callable[[str], None] | None = None,
) -> FrontEngine:
    """The engine `service.engine` names, built from its config section.

    builtin: in a front worker (`[front] isolate`, the default) when `up` gave us its zygote
    and the agent to serve the worker's connections; in this process otherwise.
    """
    if cfg.service.engine == "haproxy":
        from metaproxy.service.haproxy_engine import HaproxyEngine

        return HaproxyEngine.from_config(cfg)
    from metaproxy.front.builtin import BuiltinFront, EngineOptions

    limits = cfg.limits
    options = EngineOptions(
        max_conn_per_source=limits.max_conn_per_source,
        rate_limit=limits.rate_limit,
        pipeline=cfg.front.pipeline,
    )
    if cfg.front.isolate and zygote is not None and accept is not None:
        from metaproxy.service.frontworkers import WorkerEngine, worker_user

        uid, gid = worker_user(cfg.front.user, cfg.front.group)
        return WorkerEngine(
            zygote,
            accept,
            options,
            uid=uid,
            gid=gid,
            log_level=logging.getLevelName(logging.getLogger().level),
            log_target=cfg.service.log_target,
            drain=cfg.service.drain_timeout,
            fail=fail,
        )
    return BuiltinEngine(BuiltinFront(options), drain=cfg.service.drain_timeout)
