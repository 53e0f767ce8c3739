"""Several agent processes on one socket: Neutron's `metadata_workers`, for more than one core.

The parent binds the socket (mode and backlog applied), forks the workers, and then only
waits: a worker serves until SIGTERM. SIGTERM or SIGINT to the parent stops every worker
(SIGKILL after `STOP_TIMEOUT`) and removes the socket. A worker that dies on its own takes the
others down with it, and the parent exits 1 so that its supervisor (systemd, `metaproxy up`)
restarts the whole agent — a half-dead agent that keeps its socket would hide the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

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
        _stop(children)
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
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # Each worker opens its own store: an SQLite connection must not cross a fork.
        store = open_store()
        try:
            run_loop(worker_main(config, store, listener))
        finally:
            store.close()
        code = 0
    except BaseException:
        log.exception("metadata agent worker %d failed", os.getpid())
    finally:
        logging.shutdown()
        os._exit(code)


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
        for pid, how in _reap(children):
            log.error("metadata agent worker %d exited (%s): stopping the agent", pid, how)
            return 1


def _reap(children: set[int]) -> list[tuple[int, str]]:
    gone = []
    while children:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        children.discard(pid)
        if os.WIFSIGNALED(wstatus):
            gone.append((pid, f"signal {os.WTERMSIG(wstatus)}"))
        else:
            gone.append((pid, f"status {os.waitstatus_to_exitcode(wstatus)}"))
    return gone


def _stop(children: set[int]) -> None:
    """SIGTERM every worker, wait up to STOP_TIMEOUT, then SIGKILL the rest."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while children and time.monotonic() < deadline:
        _reap(children)
        if children:
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
    for pid in children:
        log.error("metadata agent worker %d ignored SIGTERM: killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    children.clear()
