"""The haproxy engine: one hardened haproxy per network or router.

Programmatic API (the host service's supervisor uses these; the CLI uses the same):

- `prepare(spec, settings) -> PreparedFront`: validate the binary (security/exec.py), write the
  rendered config 0600 into `<state_path>/haproxy/` (0700), and run `haproxy -c -f` on it; a
  config haproxy rejects raises ProcessError carrying haproxy's message. Nothing runs yet.
- `start(prepared, stderr=...) -> subprocess.Popen` / `await start_async(...)`: start haproxy in
  the foreground (`-db`, a child of the caller: supervise it with `wait()`), return once it
  serves (its read-only stats socket answers with its pid), with that pid in the pidfile.
  The caller owns the process: it must `stop_process` it (or hand it to a supervisor).
- `stop_process(proc, timeout)`: SIGTERM, wait `timeout`, then SIGKILL; returns the status.
- `stop(files, timeout)`: the same for a haproxy we did not start in this process, found
  through the pidfile and trusted only when its command line holds `-f <our config>`.
- `cleanup(files)`: remove config, pidfile and stats socket; every failure is logged with
  path and errno, and CleanupError names what is left.

`run_ns_proxy` / `destroy_ns_proxy` implement `metaproxy ns-proxy --engine haproxy`: by default
haproxy is left running detached and the command returns once it serves; `--foreground` keeps
it attached until SIGTERM/SIGINT, then stops it and removes its files.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

from metaproxy.config import FrontSpec, env_overrides
from metaproxy.errors import ConfigError, NamespaceError, ProcessError
from metaproxy.front.ratelimit import SourceLimits
from metaproxy.haproxy.render import RenderSettings, render_config
from metaproxy.security import exec as sexec
from metaproxy.security import files
from metaproxy.service import pidfile

log = logging.getLogger(__name__)

DEFAULT_BINARIES: tuple[Path, ...] = (Path("/usr/sbin/haproxy"), Path("/usr/bin/haproxy"))
NETNS_DIR = Path("/run/netns")
_UNIX_PATH_MAX = 107
_PID_RE = re.compile(rb"^Pid: (\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class HaproxySettings:
    """The [haproxy] config slice: which binary, from where, and how long to wait for it; and
    the per-source limits every front enforces (from [front] and [metadata_rate_limiting] under
    `up`, from the ns-proxy flags otherwise)."""

    binary: Path | None = None
    allowed_dirs: tuple[Path, ...] = sexec.DEFAULT_ALLOWED_DIRS
    log: Literal["stderr", "none"] = "stderr"
    check_timeout: float = 30.0
    start_timeout: float = 30.0
    stop_timeout: float = 10.0
    limits: SourceLimits = field(default_factory=SourceLimits)

    def __post_init__(self) -> None:
        # binary is checked by validate_binary at use: one message for every untrusted path.
        if self.log not in ("stderr", "none"):
            raise ConfigError("haproxy.log must be 'stderr' or 'none'", key="haproxy.log")
        for name in ("check_timeout", "start_timeout", "stop_timeout"):
            if not 0 < getattr(self, name) <= 600:
                raise ConfigError(f"haproxy.{name} must be in (0, 600] s", key=f"haproxy.{name}")

    @classmethod
    def from_mapping(
        cls, table: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> HaproxySettings:
        """Build from the TOML [haproxy] table plus METAPROXY_HAPROXY__* overrides."""
        merged: dict[str, Any] = {**table, **env_overrides(environ or {}, "haproxy")}
        unknown = set(merged) - (set(cls.__dataclass_fields__) - {"limits"})
        if unknown:
            raise ConfigError(f"haproxy: unknown keys {sorted(unknown)}", key="haproxy")
        kwargs: dict[str, Any] = {}
        try:
            if merged.get("binary"):
                kwargs["binary"] = Path(str(merged["binary"]))
            dirs = merged.get("allowed_dirs")
            if dirs:
                text = dirs if isinstance(dirs, str) else ":".join(str(d) for d in dirs)
                kwargs["allowed_dirs"] = sexec.parse_allowed_dirs(text)
            if "log" in merged:
                kwargs["log"] = str(merged["log"])
            for name in ("check_timeout", "start_timeout", "stop_timeout"):
                if name in merged:
                    kwargs[name] = float(merged[name])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"haproxy: {exc}", key="haproxy") from exc
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class FrontFiles:
    """Everything one haproxy front leaves on disk while it runs."""

    config: Path
    pidfile: Path
    stats: Path

    @property
    def identity_args(self) -> tuple[str, str]:
        """What /proc/<pid>/cmdline must contain for a pid to be this front's haproxy."""
        return ("-f", str(self.config))


def files_for(spec: FrontSpec) -> FrontFiles:
    """Where `spec`'s files live: `<state_path>/haproxy/<name>.{conf,sock}` and the pidfile."""
    directory = spec.state_path / "haproxy"
    return FrontFiles(
        config=directory / f"{spec.name}.conf",
        pidfile=spec.pid_file or spec.state_path / f"{spec.name}.pid",
        stats=directory / f"{spec.name}.sock",
    )


@dataclass(frozen=True, slots=True)
class PreparedFront:
    """A validated binary and a checked config, ready to start."""

    spec: FrontSpec
    settings: HaproxySettings
    binary: Path
    files: FrontFiles

    @property
    def argv(self) -> tuple[str, ...]:
        # -db: stay in the foreground, so the pid we track is the one serving.
        return (str(self.binary), "-db", "-f", str(self.files.config))


def find_binary(settings: HaproxySettings) -> Path:
    """The configured binary, or the first trusted one of DEFAULT_BINARIES; never $PATH."""
    if settings.binary is not None:
        return sexec.validate_binary(settings.binary, settings.allowed_dirs)
    return sexec.find_binary(DEFAULT_BINARIES, settings.allowed_dirs)


def prepare(spec: FrontSpec, settings: HaproxySettings) -> PreparedFront:
    """Validate the binary, write the config privately, and have haproxy check it."""
    binary = find_binary(settings)
    if spec.netns and not (NETNS_DIR / spec.netns).exists():
        raise NamespaceError(f"network namespace {spec.netns} does not exist", netns=spec.netns)
    paths = files_for(spec)
    if len(str(paths.stats)) > _UNIX_PATH_MAX:
        raise ConfigError(
            f"state_path is too long: {paths.stats} exceeds a Unix socket path", key="state_path"
        )
    files.ensure_private_dir(paths.config.parent)
    text = render_config(
        spec, RenderSettings(log=settings.log, stats_socket=paths.stats, limits=settings.limits)
    )
    files.write_private(paths.config, text)
    prepared = PreparedFront(spec, settings, binary, paths)
    check(prepared)
    return prepared


def check(prepared: PreparedFront) -> None:
    """`haproxy -c -f CONFIG`; a rejected config raises ProcessError with haproxy's message."""
    argv = [str(prepared.binary), "-c", "-f", str(prepared.files.config)]
    try:
        sexec.run(argv, timeout=prepared.settings.check_timeout, allowed_dirs=_dirs(prepared))
    except ProcessError as exc:
        raise ProcessError(
            f"haproxy rejected {prepared.files.config}: {exc.stderr or exc}",
            argv=argv,
            returncode=exc.returncode,
            stderr=exc.stderr,
        ) from exc


def _dirs(prepared: PreparedFront) -> tuple[Path, ...]:
    return prepared.settings.allowed_dirs


def _stats_pid(path: Path, timeout: float = 1.0) -> int | None:
    """Ask haproxy's stats socket for its pid; None while it is not serving yet."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"show info\n")
            data = b""
            while len(data) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    match = _PID_RE.search(data)
    return int(match.group(1)) if match else None


def _before_start(prepared: PreparedFront) -> None:
    running = pidfile.find_ours(prepared.files.pidfile, prepared.files.identity_args)
    if running is not None:
        raise ProcessError(f"haproxy for {prepared.spec.name} is already running as pid {running}")
    if not files.remove(prepared.files.stats):
        raise ProcessError(f"cannot remove the stale stats socket {prepared.files.stats}")


def _startup_failure(prepared: PreparedFront, status: int | None, output: bytes) -> ProcessError:
    message = output.decode("utf-8", "replace").strip()[-2000:]
    return ProcessError(
        f"haproxy for {prepared.spec.name} exited with status {status} while starting"
        + (f": {message}" if message else ""),
        argv=prepared.argv,
        returncode=status,
        stderr=message,
    )


def start(
    prepared: PreparedFront, *, stderr: int | IO[Any] | None = None
) -> subprocess.Popen[bytes]:
    """Start haproxy, wait until it serves, write its pid; the caller owns the process."""
    _before_start(prepared)
    proc = sexec.spawn(
        prepared.argv, allowed_dirs=_dirs(prepared), stdout=subprocess.DEVNULL, stderr=stderr
    )
    try:
        deadline = time.monotonic() + prepared.settings.start_timeout
        while _stats_pid(prepared.files.stats) != proc.pid:
            if proc.poll() is not None:
                output = proc.stderr.read() if proc.stderr else b""
                raise _startup_failure(prepared, proc.returncode, output)
            if time.monotonic() > deadline:
                raise ProcessError(
                    f"haproxy for {prepared.spec.name} did not serve within "
                    f"{prepared.settings.start_timeout:g} s",
                    argv=prepared.argv,
                )
            time.sleep(0.05)
        pidfile.write(prepared.files.pidfile, proc.pid)
    except BaseException:
        stop_process(proc, prepared.settings.stop_timeout)
        raise
    log.info("haproxy for %s serving as pid %d", prepared.spec.name, proc.pid)
    return proc


async def start_async(
    prepared: PreparedFront, *, stderr: int | IO[Any] | None = None
) -> asyncio.subprocess.Process:
    """The asyncio twin of `start`, for a supervisor that awaits `proc.wait()`."""
    _before_start(prepared)
    proc = await sexec.spawn_async(
        prepared.argv, allowed_dirs=_dirs(prepared), stdout=subprocess.DEVNULL, stderr=stderr
    )
    try:
        async with asyncio.timeout(prepared.settings.start_timeout):
            while await asyncio.to_thread(_stats_pid, prepared.files.stats) != proc.pid:
                if proc.returncode is not None:
                    output = await proc.stderr.read() if proc.stderr else b""
                    raise _startup_failure(prepared, proc.returncode, output)
                await asyncio.sleep(0.05)
        pidfile.write(prepared.files.pidfile, proc.pid)
    except TimeoutError:
        await _stop_async(proc, prepared.settings.stop_timeout)
        raise ProcessError(
            f"haproxy for {prepared.spec.name} did not serve within "
            f"{prepared.settings.start_timeout:g} s",
            argv=prepared.argv,
        ) from None
    except BaseException:
        await _stop_async(proc, prepared.settings.stop_timeout)
        raise
    log.info("haproxy for %s serving as pid %d", prepared.spec.name, proc.pid)
    return proc


async def _stop_async(proc: asyncio.subprocess.Process, timeout: float) -> int:
    if proc.returncode is None:
        proc.terminate()
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("haproxy pid %d ignored SIGTERM for %g s; killing it", proc.pid, timeout)
            proc.kill()
    return await proc.wait()


async def stop_async(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> int:
    """SIGTERM, wait `timeout`, then SIGKILL an asyncio child; returns its exit status."""
    return await _stop_async(proc, timeout)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait `timeout`, then SIGKILL a child we started; returns its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("haproxy pid %d ignored SIGTERM for %g s; killing it", proc.pid, timeout)
            proc.kill()
    return proc.wait()


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop(front: FrontFiles, timeout: float = 10.0) -> bool:
    """Stop the haproxy serving `front` if (and only if) it is ours; True if one was.

    Found through the pidfile (trusted only when /proc/<pid>/cmdline holds `-f <config>`), or,
    when the pidfile is gone or stale, by looking for a haproxy running that config.
    """
    pid = pidfile.find_ours(front.pidfile, front.identity_args)
    pids = [pid] if pid is not None else pidfile.scan(front.identity_args, exe_name="haproxy")
    if pid is None and pids:
        log.warning(
            "pidfile %s is missing or stale, but haproxy %s serves %s; stopping it",
            front.pidfile,
            ",".join(map(str, pids)),
            front.config,
        )
    for each in pids:
        _stop_pid(each, front.identity_args, timeout)
    return bool(pids)


def _stop_pid(pid: int, expected: Sequence[str], timeout: float) -> None:
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pidfile.matches(pid, expected):
        if time.monotonic() > deadline:
            log.warning("haproxy pid %d ignored SIGTERM for %g s; killing it", pid, timeout)
            _signal(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.05)
    log.info("stopped haproxy pid %d", pid)


def cleanup(front: FrontFiles) -> None:
    """Remove config, pidfile and stats socket; CleanupError names any that remain."""
    files.cleanup([front.config, front.pidfile, front.stats])


def settings_from_args(args: argparse.Namespace, *, foreground: bool) -> HaproxySettings:
    """The engine settings the ns-proxy flags ask for."""
    dirs = getattr(args, "allowed_binary_dirs", None)
    binary = getattr(args, "haproxy_binary", None)
    return HaproxySettings(
        binary=Path(binary) if binary else None,
        allowed_dirs=sexec.parse_allowed_dirs(dirs) if dirs else sexec.DEFAULT_ALLOWED_DIRS,
        # Detached, nobody reads haproxy's stderr once we return: log nothing per request.
        log="stderr" if foreground else "none",
        limits=SourceLimits.from_flags(vars(args)),
    )


def run_ns_proxy(spec: FrontSpec, args: argparse.Namespace) -> int:
    """`ns-proxy --engine haproxy`: detached by default, attached with --foreground."""
    foreground = bool(getattr(args, "foreground", False))
    settings = settings_from_args(args, foreground=foreground)
    front = files_for(spec)
    running = pidfile.find_ours(front.pidfile, front.identity_args)
    if running is not None:
        # Refused before the config is rewritten under the haproxy that is serving it.
        raise ProcessError(f"haproxy for {spec.name} is already running as pid {running}")
    try:
        prepared = prepare(spec, settings)
        proc = start(prepared, stderr=None if foreground else subprocess.PIPE)
    except BaseException:
        _quiet_cleanup(files_for(spec))
        raise
    if not foreground:
        print(f"haproxy for {spec.name} serving, pid {proc.pid}", flush=True)
        return 0
    return _serve_foreground(prepared, proc)


def _quiet_cleanup(front: FrontFiles) -> None:
    """Remove what a failed start made, unless another haproxy of ours still runs on it."""
    if pidfile.find_ours(front.pidfile, front.identity_args) is None:
        files.cleanup([front.config, front.stats])


def _serve_foreground(prepared: PreparedFront, proc: subprocess.Popen[bytes]) -> int:
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; stopping haproxy", signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping.is_set() and proc.poll() is None:
            stopping.wait(0.2)
    finally:
        status = stop_process(proc, prepared.settings.stop_timeout)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cleanup(prepared.files)
    if stopping.is_set():
        return 0
    log.error("haproxy for %s exited with status %d", prepared.spec.name, status)
    return 1


def destroy_ns_proxy(spec: FrontSpec, args: argparse.Namespace) -> int:
    """`ns-proxy --engine haproxy --destroy`: stop our haproxy (if running), remove its files."""
    front = files_for(spec)
    if not stop(front, HaproxySettings().stop_timeout):
        log.info("no running haproxy of ours for %s", spec.name)
    cleanup(front)
    return 0


__all__ = [
    "DEFAULT_BINARIES",
    "FrontFiles",
    "HaproxySettings",
    "PreparedFront",
    "check",
    "cleanup",
    "destroy_ns_proxy",
    "files_for",
    "find_binary",
    "prepare",
    "run_ns_proxy",
    "start",
    "start_async",
    "stop",
    "stop_async",
    "stop_process",
]
