"""`metaproxy ns-proxy --engine builtin`: one front in its own process, Neutron-style.

Detached by default: the command forks *before* any event loop or thread exists, the child
starts serving, writes its pid to the pidfile and reports readiness over a pipe, and only then
does the parent exit 0 (non-zero, with the child's error, when it failed). `--foreground` serves
in the calling process until SIGTERM/SIGINT. `--destroy` stops the process named by the pidfile
(only if its command line proves it is ours) and removes the pidfile.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn, Protocol

from metaproxy import errors
from metaproxy.config import FrontSpec
from metaproxy.errors import ConfigError, MetaproxyError, ProcessError
from metaproxy.front.builtin import BuiltinFront, EngineOptions, new_event_loop
from metaproxy.front.ratelimit import SourceLimits
from metaproxy.http import sequence
from metaproxy.security import files
from metaproxy.service import pidfile

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
MAX_WORKERS = 64
STOP_TIMEOUT = 10.0


def pid_path(spec: FrontSpec) -> Path:
    return spec.pid_file or spec.state_path / f"{spec.name}.pid"


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The engine-wide knobs from ns-proxy flags (absent flags keep the defaults)."""
    limits = SourceLimits.from_flags(vars(args))
    pipeline = getattr(args, "pipeline", None)
    if pipeline is None:
        pipeline = sequence.PIPELINE
    return EngineOptions(
        max_conn_per_source=limits.max_conn_per_source,
        rate_limit=limits.rate_limit,
        pipeline=sequence.check_pipeline(pipeline, "--pipeline"),
    )


def run_ns_proxy(spec: FrontSpec, args: argparse.Namespace) -> int:
    """Serve `spec` detached (default) or in the foreground; see the module docstring."""
    options = engine_options(args)
    count = worker_count(args)
    path = pid_path(spec)
    files.ensure_private_dir(spec.state_path)
    if not path.parent.exists():
        files.ensure_private_dir(path.parent)
    running = _find_ours(path, spec)
    if running is not None:
        raise ProcessError(f"{spec.name} is already served by pid {running} ({path})")
    serve: Serve = _serve
    if count > 1:
        from metaproxy.front import workers

        serve = functools.partial(workers.serve_group, count)
    if getattr(args, "foreground", False):
        return serve(spec, options, path, ready=Ready(None), log_file=None)
    return _detach(spec, options, path, getattr(args, "log_file", None), serve)


def worker_count(args: argparse.Namespace) -> int:
    """`--workers`, checked: 1 (the default, one process) to MAX_WORKERS."""
    count = getattr(args, "workers", None)
    if count is None:
        return 1
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(
            f"--workers must be between 1 and {MAX_WORKERS}, not {count}", key="workers"
        )
    return int(count)


def destroy_ns_proxy(spec: FrontSpec, args: argparse.Namespace) -> int:
    """Stop the detached front for `spec` (if it is ours) and remove its pidfile."""
    path = pid_path(spec)
    pid = _find_ours(path, spec)
    if pid is None:
        log.info("%s: no running front found via %s", spec.name, path)
    else:
        _stop(pid, spec.name)
    if not files.remove(path):
        raise errors.CleanupError(f"could not remove {path} (see log)", paths=[str(path)])
    return 0


# -- detaching -------------------------------------------------------------------------------


class Ready:
    """The child's end of the readiness pipe: one message, then closed (never written twice)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, message: str) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, message.encode("utf-8", "replace") + b"\n")
        except OSError:
            pass
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Close this end unwritten (a forked worker must not hold its parent's pipe open)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class Serve(Protocol):
    """What serves a front in the process that runs it (one loop, or a group of workers)."""

    def __call__(
        self,
        spec: FrontSpec,
        options: EngineOptions,
        path: Path,
        *,
        ready: Ready,
        log_file: Path | None,
    ) -> int: ...


def _detach(
    spec: FrontSpec, options: EngineOptions, path: Path, log_file: Path | None, serve: Serve
) -> int:
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: becomes the front
        os.close(read_fd)
        ready = Ready(write_fd)
        code = 1
        try:
            os.setsid()
            code = serve(spec, options, path, ready=ready, log_file=log_file)
        except BaseException as exc:  # reported to the parent; the child must never return
            ready.send(describe(exc))
            log.error("%s: %s", spec.name, exc)
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        message = await_ready(read_fd, pid)
    finally:
        os.close(read_fd)
    if message.startswith("ok"):
        log.info("%s: serving, pid %d (pidfile %s)", spec.name, pid, path)
        return 0
    os.waitpid(pid, 0)
    raise_reported(message, f"{spec.name}: the front exited before serving")


def raise_reported(message: str, default: str) -> NoReturn:
    """Raise the error a child reported over its readiness pipe (see `describe`)."""
    kind, _, text = message.partition(":")
    if kind == "ConfigError":
        raise ConfigError(text)
    if kind == "NamespaceError":
        raise errors.NamespaceError(text)
    raise ProcessError(text or default)


def await_ready(fd: int, pid: int) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\n"):
            break
    if not data:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return data.decode("utf-8", "replace").strip()


def describe(exc: BaseException) -> str:
    kind = type(exc).__name__ if isinstance(exc, MetaproxyError) else "ProcessError"
    text = str(exc).replace("\n", " ") or type(exc).__name__
    return f"{kind}:{text}"


def quiet_stdio(log_file: Path | None) -> None:
    """Detached: stdin from /dev/null, output to the log file or nowhere (never the caller's
    pipes, which would keep a capturing caller waiting for our exit)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    target = devnull
    if log_file is not None:
        target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    os.dup2(target, 1)
    os.dup2(target, 2)
    for fd in {devnull, target}:
        if fd > 2:
            os.close(fd)


# -- serving ---------------------------------------------------------------------------------


def _serve(
    spec: FrontSpec,
    options: EngineOptions,
    path: Path,
    *,
    ready: Ready,
    log_file: Path | None,
) -> int:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_main(spec, options, path, ready, log_file))


async def _main(
    spec: FrontSpec, options: EngineOptions, path: Path, ready: Ready, log_file: Path | None
) -> int:
    engine = BuiltinFront(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    dropped = False
    try:
        await engine.add(spec)
        pidfile.write(path, os.getpid())
        dropped = drop_privileges(spec.user, spec.group)
        if ready.fd is not None:
            ready.send(f"ok {os.getpid()}")
            quiet_stdio(log_file)
        await stop.wait()
        log.info("%s: stopping", spec.name)
    finally:
        await engine.close()
    if dropped and not os.access(path.parent, os.W_OK):
        log.warning("%s: pidfile %s is left for `--destroy` (no longer root)", spec.name, path)
    else:
        files.remove(path)
    return 0


def drop_privileges(uid: int | None, gid: int | None) -> bool:
    """Switch to the configured user/group after binding; True when anything changed."""
    if uid is None and gid is None:
        return False
    if os.geteuid() != 0:
        if uid in (None, os.geteuid()) and gid in (None, os.getegid()):
            return False
        raise ConfigError("switching user or group needs root", key="metadata_proxy_user")
    if gid is None and uid is not None:
        import pwd

        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
    try:
        if gid is not None:
            os.setgroups([gid])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    except OSError as exc:
        raise ConfigError(
            f"cannot drop privileges: {exc.strerror}", key="metadata_proxy_user"
        ) from exc
    log.info("running as uid %d gid %d", os.getuid(), os.getgid())
    return True


# -- stopping --------------------------------------------------------------------------------


def _find_ours(path: Path, spec: FrontSpec) -> int | None:
    """The pid in `path` if that process is an ns-proxy for this identity."""
    pid = pidfile.read(path)
    if pid is None:
        return None
    argv = pidfile.cmdline(pid)
    if argv is None:
        return None
    if "ns-proxy" not in argv or not any(spec.identity.id in part for part in argv):
        log.warning("pidfile %s names pid %d, which is not this front; ignoring it", path, pid)
        return None
    return pid


def _stop(pid: int, name: str) -> None:
    """SIGTERM, wait, then SIGKILL: the process is not our child, so poll /proc."""
    for signum, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if pidfile.cmdline(pid) is None:
                log.info("%s: stopped pid %d", name, pid)
                return
            time.sleep(0.05)
        log.warning("%s: pid %d ignored %s", name, pid, signal.Signals(signum).name)
    raise ProcessError(f"{name}: pid {pid} would not stop")
