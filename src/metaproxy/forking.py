"""Forked worker processes: start one before any event loop exists, reap them, stop them all.

Shared by the agent's workers and the builtin front's workers (no exec: a worker is this
program, already loaded). The parent blocks the signals it waits for with `sigwaitinfo` before
its first fork, so none is lost between two waits; `fork` gives the child the caller's mask
back before it runs anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1

Mask = Iterable[int | signal.Signals]


def fork(main: Callable[[], int], mask: Mask, *, label: str) -> int:
    """Run `main` in a forked child with signal mask `mask`; the child's pid (parent side).

    The child never returns: it exits with `main`'s status, or 1 when `main` raised.
    """
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        code = main()
    except BaseException:
        log.exception("%s %d failed", label, os.getpid())
    finally:
        logging.shutdown()
        os._exit(code)


def prctl(option: int, value: int) -> None:
    """prctl(2) with one argument; OSError on failure."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Get `sig` when `parent` dies (a SIGKILLed supervisor must not leave orphans).

    Call it after dropping privileges: the kernel clears the setting when credentials change.
    """
    try:
        prctl(PR_SET_PDEATHSIG, sig)
    except OSError as exc:
        log.warning("%s", exc)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def reap(children: set[int]) -> list[tuple[int, str]]:
    """Collect every child of `children` that has exited (without blocking): (pid, how)."""
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


def stop(children: set[int], timeout: float, *, label: str) -> None:
    """SIGTERM every child, wait up to `timeout`, then SIGKILL the rest; `children` ends empty.

    SIGCHLD must be blocked in the caller (it is waited for here).
    """
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while children and time.monotonic() < deadline:
        reap(children)
        if children:
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
    for pid in children:
        log.error("%s %d ignored SIGTERM: killing it", label, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    children.clear()
