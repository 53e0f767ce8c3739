"""The one place metaproxy starts another program: validated binary, minimal env, no inherited fds.

The launch contract (ARCHITECTURE.md) in code:

1. `validate_binary` accepts only an absolute path whose directory is on an allow-list, that is a
   regular executable file owned by root (or by us) and not writable by group or others, whose
   resolved target is also inside the allow-list, and whose every directory above (of the path
   and of its target) is likewise trusted. Never `which`, never `$PATH`: Neutron ran whatever
   `which haproxy` found first, so a writable directory early in `$PATH` was a root shell.
2. `minimal_env` builds the child's whole environment: `PATH` (safe directories, only for the
   child's own lookups), `LANG`, and what the caller passes explicitly, minus anything that
   changes how a program loads or talks (`LD_*`, `PYTHON*`, `*_proxy`) or looks like a secret.
3. `spawn` / `spawn_async` run argv through `execve` (no shell) with that env, `close_fds=True`
   and only the descriptors in `pass_fds`, stdin from /dev/null, a new session and umask 077.

Callers own the returned process: they must wait for it (or hand it to a supervisor).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import shlex
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from metaproxy.errors import ProcessError, UntrustedBinary

log = logging.getLogger(__name__)

DEFAULT_ALLOWED_DIRS: tuple[Path, ...] = tuple(
    Path(p) for p in ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")
)
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
CHILD_UMASK = 0o077

# Variables that change how a program is loaded or where it sends traffic, and names that look
# like credentials: never passed to a child, even when a caller asks.
_FORBIDDEN_ENV = re.compile(
    r"(?i)^(LD_.*|PYTHON.*|.*_proxy|.*(SECRET|PASSW|TOKEN|CREDENTIAL|APIKEY|API_KEY|PRIVATE).*)$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT


def parse_allowed_dirs(text: str) -> tuple[Path, ...]:
    """Parse a colon- or comma-separated list of absolute directories (the CLI's allow-list)."""
    dirs = tuple(Path(p) for p in re.split(r"[:,]", text) if p.strip())
    for d in dirs:
        if not d.is_absolute():
            raise UntrustedBinary(str(d), "allow-listed directories must be absolute paths")
    if not dirs:
        raise UntrustedBinary(text, "the allow-list of binary directories is empty")
    return dirs


def _trusted_owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _check_node(path: str, st: os.stat_result, owners: frozenset[int], what: str) -> str | None:
    """The reason `path` (already stat'ed) cannot be trusted, or None."""
    if st.st_uid not in owners:
        return f"{what} {path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _check_dirs(directory: str, binary: str, owners: frozenset[int]) -> None:
    """`directory` and every directory above it up to / must be trusted."""
    current = directory
    while True:
        st = os.stat(current)
        reason = _check_node(current, st, owners, "directory")
        if reason:
            raise UntrustedBinary(binary, reason)
        if current == "/":
            return
        current = os.path.dirname(current)


_MAX_LINKS = 40


def _resolve_trusted(path: str, binary: str, owners: frozenset[int]) -> str:
    """realpath(path), also refusing a symlink anywhere on the way that sits in an untrusted
    directory: whoever can write there can point the link at any other binary."""
    resolved = "/"
    pending = [p for p in path.split("/") if p]
    links = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, name)
        try:
            st = os.lstat(candidate)
        except OSError as exc:
            raise UntrustedBinary(binary, f"cannot stat {candidate}: {exc.strerror}") from exc
        if not stat.S_ISLNK(st.st_mode):
            resolved = candidate
            continue
        links += 1
        if links > _MAX_LINKS:
            raise UntrustedBinary(binary, "too many levels of symbolic links")
        _check_dirs(resolved, binary, owners)
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = "/"
        pending[:0] = [p for p in target.split("/") if p]
    return resolved


def _inside(directory: str, allowed: Iterable[str]) -> bool:
    return directory in set(allowed)


def validate_binary(
    path: str | os.PathLike[str],
    allowed_dirs: Sequence[str | os.PathLike[str]] = DEFAULT_ALLOWED_DIRS,
) -> Path:
    """Return the resolved path of a trusted binary, or raise UntrustedBinary(path, reason)."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        raise UntrustedBinary(text, "not an absolute path (binaries are never looked up in $PATH)")
    normal = os.path.normpath(text)
    allowed = [os.path.normpath(os.fspath(d)) for d in allowed_dirs]
    allowed_real = [os.path.realpath(d) for d in allowed]
    if not _inside(os.path.dirname(normal), allowed):
        raise UntrustedBinary(
            text, f"its directory is not on the allow-list ({', '.join(allowed) or 'empty'})"
        )
    owners = _trusted_owners()
    real = os.path.realpath(normal)
    if not _inside(os.path.dirname(real), allowed_real):
        raise UntrustedBinary(text, f"it resolves to {real}, outside the allow-listed directories")
    try:
        st = os.stat(real)
    except OSError as exc:
        raise UntrustedBinary(text, f"cannot stat {real}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedBinary(text, f"{real} is not a regular file")
    if not st.st_mode & stat.S_IXUSR:
        raise UntrustedBinary(text, f"{real} is not executable")
    if _resolve_trusted(normal, text, owners) != real:
        raise UntrustedBinary(text, f"{real} changed while it was being checked")
    reason = _check_node(real, st, owners, "binary")
    if reason:
        raise UntrustedBinary(text, reason)
    _check_dirs(os.path.dirname(real), text, owners)
    # The literal directory may be a symlink (merged /usr: /sbin → /usr/sbin); whoever can write
    # there can replace the binary, so it is held to the same rule.
    _check_dirs(os.path.realpath(os.path.dirname(normal)), text, owners)
    return Path(real)


def find_binary(
    candidates: Sequence[str | os.PathLike[str]],
    allowed_dirs: Sequence[str | os.PathLike[str]] = DEFAULT_ALLOWED_DIRS,
) -> Path:
    """The first candidate that exists and validates; each refusal is logged, the last raised."""
    last: UntrustedBinary | None = None
    for candidate in candidates:
        if not os.path.lexists(candidate):
            continue
        try:
            return validate_binary(candidate, allowed_dirs)
        except UntrustedBinary as exc:
            log.warning("%s", exc)
            last = exc
    if last is not None:
        raise last
    names = ", ".join(os.fspath(c) for c in candidates)
    raise UntrustedBinary(names, "no such file (install it or name a binary explicitly)")


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's entire environment: PATH, LANG and the explicitly passed, harmless extras."""
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
    for name, value in (extra or {}).items():
        if not _ENV_NAME.match(name) or _FORBIDDEN_ENV.match(name):
            raise ProcessError(f"refusing to pass environment variable {name!r} to a child")
        if "\0" in value:
            raise ProcessError(f"environment variable {name!r} holds a NUL byte")
        env[name] = value
    return env


def _uvloop_child_setup(umask: int, keep: tuple[int, ...]) -> None:
    """In the forked child: set the umask, and mark every descriptor but 0-2 and `keep`
    close-on-exec (closing them here would also close uvloop's own exec-status pipe)."""
    os.umask(umask)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, fd in keep)
            except OSError:
                pass  # the listing's own descriptor, already closed


def _popen_kwargs(
    argv: Sequence[str],
    allowed_dirs: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str] | None,
    pass_fds: Sequence[int],
) -> tuple[list[str], dict[str, Any]]:
    if not argv:
        raise ProcessError("nothing to run: empty argv")
    executable = validate_binary(argv[0], allowed_dirs)
    args = [os.fspath(a) for a in argv]
    kwargs: dict[str, Any] = {
        "executable": str(executable),
        "env": minimal_env(env),
        "close_fds": True,
        "pass_fds": tuple(pass_fds),
        "stdin": DEVNULL,
        "start_new_session": True,
        "umask": CHILD_UMASK,
        "cwd": "/",
    }
    return args, kwargs


def spawn(
    argv: Sequence[str],
    *,
    allowed_dirs: Sequence[str | os.PathLike[str]] = DEFAULT_ALLOWED_DIRS,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv (argv[0] validated, absolute) with a minimal env; never via a shell."""
    args, kwargs = _popen_kwargs(argv, allowed_dirs, env, pass_fds)
    log.info("starting %s", shlex.join(args))
    try:
        return subprocess.Popen(args, stdout=stdout, stderr=stderr, **kwargs)  # noqa: S603
    except OSError as exc:
        raise ProcessError(f"cannot start {args[0]}: {exc.strerror}", argv=args) from exc


async def spawn_async(
    argv: Sequence[str],
    *,
    allowed_dirs: Sequence[str | os.PathLike[str]] = DEFAULT_ALLOWED_DIRS,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> asyncio.subprocess.Process:
    """The asyncio twin of `spawn`, with the same checks and the same child setup."""
    args, kwargs = _popen_kwargs(argv, allowed_dirs, env, pass_fds)
    if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        # uvloop's subprocess_exec has no `umask` (ValueError: unexpected kwargs) and ignores
        # close_fds (an inheritable descriptor of the parent reached the child: proven in
        # tests/integration/test_exec.py). preexec_fn runs in the child between fork and exec.
        umask = kwargs.pop("umask")
        kwargs["preexec_fn"] = functools.partial(_uvloop_child_setup, umask, tuple(pass_fds))
    log.info("starting %s", shlex.join(args))
    try:
        return await asyncio.create_subprocess_exec(*args, stdout=stdout, stderr=stderr, **kwargs)
    except OSError as exc:
        raise ProcessError(f"cannot start {args[0]}: {exc.strerror}", argv=args) from exc


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    allowed_dirs: Sequence[str | os.PathLike[str]] = DEFAULT_ALLOWED_DIRS,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run argv to completion, return its output; a non-zero exit raises ProcessError with it."""
    proc = spawn(argv, allowed_dirs=allowed_dirs, env=env, stdout=PIPE, stderr=STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ProcessError(
            f"{argv[0]} did not finish within {timeout:g} s", argv=list(argv)
        ) from None
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        tail = text.strip()[-2000:]
        raise ProcessError(
            f"{argv[0]} exited with status {proc.returncode}: {tail}",
            argv=list(argv),
            returncode=proc.returncode,
            stderr=tail,
        )
    return text
