"""`ns-proxy --engine builtin --workers N`: one network's front served by N forked processes.

The parent, still root, opens N listening sockets for the network as one SO_REUSEPORT group
inside the namespace, steered by `front.steering` (every connection from one source address
reaches the same worker, so the per-source connection cap and rate limit stay exact; loopback
clients are spread by source port), then forks the workers before any event loop exists. Each
worker keeps only its own socket, drops privileges like a single front does, and serves with its
own loop. The network's `maxconn` is split: each worker gets at most ceil(maxconn / N), and
together exactly maxconn.

The parent keeps every socket open for the life of the group: a dead worker's connections wait
in its socket's queue until the replacement accepts them (no SYN is lost, the namespace is not
entered again), and the group's order, which the steering program indexes, never shifts. It
supervises: a worker that exits is forked again after a capped exponential backoff (a warning;
an error once the backoff reaches its cap: a crash loop). SIGTERM/SIGINT stop every worker
(SIGTERM, drain, SIGKILL after the stop timeout), remove the pidfile and end the parent; SIGHUP is
logged and ignored (a front has nothing to reload). Workers ignore SIGINT and SIGHUP (the parent
decides) and get SIGTERM if the parent dies (PR_SET_PDEATHSIG).

Trade-off: each worker is a whole process (a few MiB), and one busy instance still gets one
core; more workers only help a network whose traffic comes from many sources.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from metaproxy import forking
from metaproxy.config import FrontSpec
from metaproxy.errors import ConfigError, MetaproxyError
from metaproxy.front import netns, steering
from metaproxy.front.builtin import BuiltinFront, EngineOptions, listen_spec, new_event_loop
from metaproxy.front.process import (
    Ready,
    await_ready,
    describe,
    drop_privileges,
    quiet_stdio,
    raise_reported,
)
from metaproxy.security import files
from metaproxy.service import pidfile

log = logging.getLogger(__name__)

RESTART_MIN = 0.1
RESTART_MAX = 5.0
HEALTHY_AFTER = 10.0  # a worker that lived this long restarts after RESTART_MIN again
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP}


def split_maxconn(maxconn: int, workers: int) -> list[int]:
    """Each worker's share of `maxconn`: at most ceil(maxconn / workers), exactly maxconn in all."""
    if workers > maxconn:
        raise ConfigError(f"{workers} workers cannot share maxconn {maxconn}", key="workers")
    base, extra = divmod(maxconn, workers)
    return [base + 1 if i < extra else base for i in range(workers)]


def serve_group(
    count: int,
    spec: FrontSpec,
    options: EngineOptions,
    path: Path,
    *,
    ready: Ready,
    log_file: Path | None,
) -> int:
    """Serve `spec` with `count` workers until SIGTERM/SIGINT (see the module docstring)."""
    shares = split_maxconn(spec.maxconn, count)
    # Each socket's backlog is sized by the largest worker's share of maxconn.
    listen = listen_spec(dataclasses.replace(spec, maxconn=shares[0]), freebind=options.freebind)
    family = socket.AF_INET6 if ":" in spec.bind_address else socket.AF_INET
    program = steering.program(family, count)
    sockets = netns.open_listeners(listen, count, functools.partial(_steer, program))
    workers = [
        _Worker(i, dataclasses.replace(spec, maxconn=share), sock)
        for i, (share, sock) in enumerate(zip(shares, sockets, strict=True))
    ]
    return _Group(spec, options, workers, ready, log_file).run(path)


def _steer(program: list[steering.Instruction], sockets: list[socket.socket]) -> None:
    try:
        steering.attach(sockets[0], program)
    except OSError as exc:
        raise ConfigError(
            f"cannot attach the steering program (SO_ATTACH_REUSEPORT_CBPF): {exc.strerror}",
            key="workers",
        ) from exc


@dataclass(eq=False)
class _Worker:
    index: int
    spec: FrontSpec
    sock: socket.socket
    pid: int = 0
    started: float = 0.0
    delay: float = RESTART_MIN
    restart_at: float | None = None


class _Group:
    """The parent's side: start, watch, restart and stop the workers (no event loop here)."""

    def __init__(
        self,
        spec: FrontSpec,
        options: EngineOptions,
        workers: list[_Worker],
        ready: Ready,
        log_file: Path | None,
    ) -> None:
        self.spec = spec
        self.options = options
        self.workers = workers
        self.ready = ready
        self.log_file = log_file
        self.parent = os.getpid()
        self.mask: set[int | signal.Signals] = set()
        self.pids: set[int] = set()
        self.by_pid: dict[int, _Worker] = {}
        self.stop_timeout = options.drain_timeout + 2.0

    def run(self, path: Path) -> int:
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pidfile.write(path, self.parent)
            if self.ready.fd is not None:  # detached: the workers inherit quiet stdio
                quiet_stdio(self.log_file)
            for worker in self.workers:
                self._start(worker, report=True)
            log.info(
                "%s: %d workers %s, maxconn %s",
                self.spec.name,
                len(self.workers),
                [w.pid for w in self.workers],
                [w.spec.maxconn for w in self.workers],
            )
            self.ready.send(f"ok {self.parent}")
            self._supervise()
        finally:
            forking.stop(self.pids, self.stop_timeout, label=f"{self.spec.name} worker")
            for worker in self.workers:
                worker.sock.close()
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            files.remove(path)
        return 0

    # -- starting ----------------------------------------------------------------------------

    def _start(self, worker: _Worker, *, report: bool) -> None:
        """Fork `worker`; with `report`, wait until it serves (raise what it reported)."""
        read_fd, write_fd = os.pipe() if report else (None, None)
        try:
            pid = forking.fork(
                functools.partial(self._work, worker, read_fd, write_fd),
                self.mask,
                label=f"{self.spec.name} worker {worker.index}",
            )
        except BaseException:
            for fd in (read_fd, write_fd):
                if fd is not None:
                    os.close(fd)
            raise
        worker.pid, worker.started = pid, time.monotonic()
        self.pids.add(pid)
        self.by_pid[pid] = worker
        if read_fd is None or write_fd is None:
            return
        os.close(write_fd)
        try:
            message = await_ready(read_fd, pid)
        finally:
            os.close(read_fd)
        if not message.startswith("ok"):
            raise_reported(message, f"{self.spec.name}: worker {worker.index} did not start")

    def _work(self, worker: _Worker, read_fd: int | None, write_fd: int | None) -> int:
        """The worker's life, in the forked child."""
        ready = Ready(write_fd)
        try:
            if read_fd is not None:
                os.close(read_fd)
            self.ready.discard()
            for other in self.workers:
                if other is not worker:
                    other.sock.close()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            drop_privileges(self.spec.user, self.spec.group)
            forking.die_with_parent(self.parent)
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                return runner.run(_serve(worker, self.options, ready))
        except MetaproxyError as exc:
            ready.send(describe(exc))
            log.error("%s worker %d: %s", self.spec.name, worker.index, exc)
            return 1
        except BaseException as exc:
            ready.send(describe(exc))
            raise

    # -- supervising -------------------------------------------------------------------------

    def _supervise(self) -> None:
        """Until SIGTERM/SIGINT: restart workers that exit."""
        while True:
            wait = self._due_in()
            info = (
                signal.sigwaitinfo(_SIGNALS)
                if wait is None
                else signal.sigtimedwait(_SIGNALS, wait)
            )
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    log.info("%s: signal %d, stopping the workers", self.spec.name, info.si_signo)
                    return
                if info.si_signo == signal.SIGHUP:
                    log.info("%s: SIGHUP ignored (nothing to reload)", self.spec.name)
                self._reap()
            self._restart_due()

    def _reap(self) -> None:
        for pid, how in forking.reap(self.pids):
            worker = self.by_pid.pop(pid, None)
            if worker is None:
                continue
            now = time.monotonic()
            lived = now - worker.started
            if lived >= HEALTHY_AFTER:
                worker.delay = RESTART_MIN
            worker.restart_at = now + worker.delay
            log.log(
                logging.ERROR if worker.delay >= RESTART_MAX else logging.WARNING,
                "%s: worker %d (pid %d) exited (%s) after %.1f s; restarting it in %.1f s",
                self.spec.name,
                worker.index,
                pid,
                how,
                lived,
                worker.delay,
            )
            worker.delay = min(worker.delay * 2, RESTART_MAX)

    def _due_in(self) -> float | None:
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        return max(min(due) - time.monotonic(), 0.0) if due else None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is None or worker.restart_at > now:
                continue
            worker.restart_at = None
            try:
                self._start(worker, report=False)
            except OSError as exc:
                log.error("%s: cannot fork worker %d: %s", self.spec.name, worker.index, exc)
                worker.restart_at = now + worker.delay
                worker.delay = min(worker.delay * 2, RESTART_MAX)


async def _serve(worker: _Worker, options: EngineOptions, ready: Ready) -> int:
    """One worker: serve its socket until SIGTERM, then drain."""
    engine = BuiltinFront(options)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await engine.add(worker.spec, sock=worker.sock)
        ready.send(f"ok {os.getpid()}")
        await stop.wait()
        log.info("%s worker %d: stopping", worker.spec.name, worker.index)
    finally:
        await engine.close()
    return 0
