"""Several agent processes on one socket: Neutron's `metadata_workers`, for more than one core.

The parent binds the socket (mode and backlog applied), forks the workers, and then only
waits: a worker serves until SIGTERM. SIGTERM or SIGINT to the parent stops every worker
(SIGKILL after `STOP_TIMEOUT`) and removes the socket. A worker that dies on its own takes the
others down with it, and the parent exits 1 so that its supervisor (systemd, `metaproxy up`)
restarts the whole agent — a half-dead agent that keeps its socket would hide the failure.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from metaproxy import forking
from metaproxy.agent.config import AgentConfig
from metaproxy.agent.listener import Listener
from metaproxy.agent.server import listen, serve
from metaproxy.metadata.store import SqliteStore

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}

RunLoop = Callable[[Coroutine[Any, Any, None]], None]
OpenStore = Callable[[], SqliteStore]


def run_workers(config: AgentConfig, open_store: OpenStore, run_loop: RunLoop) -> int:
    """Serve with `config.workers` forked processes until SIGTERM/SIGINT; the exit status."""
    listener = listen(config)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    children: set[int] = set()
    status = 0
    try:
        for _ in range(config.workers):
            children.add(_fork(config, listener, open_store, run_loop, old_mask))
        log.info("metadata agent: %d workers %s", len(children), sorted(children))
        status = _supervise(children)
    finally:
        forking.stop(children, STOP_TIMEOUT, label="metadata agent worker")
        listener.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return status


def _fork(
    config: AgentConfig,
    listener: Listener,
    open_store: OpenStore,
    run_loop: RunLoop,
    mask: set[int | signal.Signals],
) -> int:
    def main() -> int:
        # Each worker opens its own store: an SQLite connection must not cross a fork.
        store = open_store()
        try:
            run_loop(worker_main(config, store, listener))
        finally:
            store.close()
        return 0

    return forking.fork(main, mask, label="metadata agent worker")


async def worker_main(config: AgentConfig, store: SqliteStore, listener: Listener | None) -> None:
    """Serve until SIGTERM or SIGINT (one worker, or the whole agent when `listener` is None)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(config, store, stop, listener)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _supervise(children: set[int]) -> int:
    """Wait for a stop signal (→ 0) or a worker's own exit (→ 1)."""
    while True:
        info = signal.sigwaitinfo(_SIGNALS)
        if info.si_signo != signal.SIGCHLD:
            log.info("metadata agent: signal %d, stopping the workers", info.si_signo)
            return 0
        for pid, how in forking.reap(children):
            log.error("metadata agent worker %d exited (%s): stopping the agent", pid, how)
            return 1
