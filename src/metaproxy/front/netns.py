"""Listening sockets inside network namespaces, made without the serving code ever moving.

Python 3.11 has no `os.setns`, so a dedicated short-lived thread calls setns(2) through ctypes,
opens, binds and listens, and hands the socket back; then the thread ends, taking its namespace
with it. A socket keeps the namespace it was created in, so the event loop serves it from the
host namespace like any other. Never run this in a pooled executor thread: a reused thread would
carry the tenant namespace into unrelated work.

IP_FREEBIND is off by default, deliberately: an address missing from the namespace is a
misconfiguration the operator should hear about at once, not a front that silently never
receives a packet. Callers that must start before the address exists may ask for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from metaproxy.errors import ConfigError, NamespaceError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
IP_FREEBIND = 15
IPV6_FREEBIND = 78
BACKLOG = 1024

_libc: ctypes.CDLL | None = None
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """Where one listener goes."""

    address: str
    port: int
    netns: str | None = None
    interface: str | None = None
    freebind: bool = False
    backlog: int = BACKLOG


def _setns(netns: str) -> None:
    """Move the calling thread into /run/netns/NAME."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    path = NETNS_DIR / netns
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(f"network namespace {netns!r} does not exist", netns=netns) from None
    except OSError as exc:
        raise NamespaceError(
            f"cannot open network namespace {netns!r}: {exc.strerror}", netns=netns
        ) from exc
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NamespaceError(
                f"cannot enter network namespace {netns!r}: {os.strerror(err)}", netns=netns
            )
    finally:
        os.close(fd)


def _bind(spec: ListenSpec) -> socket.socket:
    """Create, bind and listen in the calling thread's namespace."""
    sock = _bound(spec)
    _listen(spec, sock)
    return sock


def _bound(spec: ListenSpec, *, reuseport: bool = False) -> socket.socket:
    """Create and bind (not listen yet) in the calling thread's namespace."""
    address = ipaddress.ip_address(spec.address)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sockaddr: tuple[str, int] | tuple[str, int, int, int]
    if family == socket.AF_INET6:
        scope = 0
        if spec.interface:
            try:
                scope = socket.if_nametoindex(spec.interface)
            except OSError:
                raise ConfigError(
                    f"interface {spec.interface!r} does not exist"
                    + (f" in namespace {spec.netns!r}" if spec.netns else ""),
                    key="interface",
                ) from None
        sockaddr = (spec.address, spec.port, 0, scope)
    else:
        sockaddr = (spec.address, spec.port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    with _unbindable(spec, sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if spec.freebind:
            level, option = (
                (socket.IPPROTO_IPV6, IPV6_FREEBIND)
                if family == socket.AF_INET6
                else (socket.IPPROTO_IP, IP_FREEBIND)
            )
            sock.setsockopt(level, option, 1)
        if spec.interface and family == socket.AF_INET:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, spec.interface.encode())
        sock.bind(sockaddr)
    return sock


def _listen(spec: ListenSpec, sock: socket.socket) -> None:
    with _unbindable(spec, sock):
        sock.listen(spec.backlog)
        sock.setblocking(False)


@contextlib.contextmanager
def _unbindable(spec: ListenSpec, sock: socket.socket) -> Iterator[None]:
    """Close `sock` and raise ConfigError when the body fails with OSError."""
    try:
        yield
    except OSError as exc:
        sock.close()
        where = f" in namespace {spec.netns!r}" if spec.netns else ""
        hint = " (the address is not configured there)" if exc.errno == errno.EADDRNOTAVAIL else ""
        raise ConfigError(
            f"cannot listen on {_show(spec)}{where}: {exc.strerror}{hint}", key="bind_address"
        ) from exc


def _show(spec: ListenSpec) -> str:
    if ":" in spec.address:
        scope = f"%{spec.interface}" if spec.interface else ""
        return f"[{spec.address}{scope}]:{spec.port}"
    return f"{spec.address}:{spec.port}"


def open_listener(spec: ListenSpec) -> socket.socket:
    """Return a non-blocking listening socket, made inside `spec.netns` when one is named.

    Raises NamespaceError (namespace missing or not enterable) or ConfigError (unbindable).
    Blocks the caller briefly; from asyncio use `open_listener_async`.
    """
    return _in_namespace(spec.netns, lambda: _bind(spec))


def open_listeners(
    spec: ListenSpec, count: int, prepare: Callable[[list[socket.socket]], None]
) -> list[socket.socket]:
    """`count` listening sockets on one address as one SO_REUSEPORT group, in group order.

    `prepare(sockets)` runs once all are bound and before any listens (where a steering
    program is attached: no connection reaches the group before it is steered). The group's
    order is the order of listen(2), which is the order of the list. All or nothing.
    """

    def make() -> list[socket.socket]:
        sockets: list[socket.socket] = []
        try:
            for _ in range(count):
                sockets.append(_bound(spec, reuseport=True))
            prepare(sockets)
            for sock in sockets:
                _listen(spec, sock)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets

    return _in_namespace(spec.netns, make)


def _in_namespace(netns: str | None, work: Callable[[], _T]) -> _T:
    """`work()` in a new thread that entered `netns` first (here when None); its result."""
    if netns is None:
        return work()
    result: list[_T | BaseException] = []

    def run() -> None:
        try:
            _setns(netns)
            result.append(work())
        except BaseException as exc:  # handed to the caller's thread below
            result.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


async def open_listener_async(spec: ListenSpec) -> socket.socket:
    """`open_listener` without blocking the loop (its own thread, never a pooled one)."""
    if spec.netns is None:
        return _bind(spec)
    loop = asyncio.get_running_loop()
    future: asyncio.Future[socket.socket] = loop.create_future()

    def deliver(outcome: socket.socket | BaseException) -> None:
        if future.cancelled():
            if isinstance(outcome, socket.socket):
                outcome.close()
        elif isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def work() -> None:
        outcome: socket.socket | BaseException
        try:
            _setns(spec.netns)  # type: ignore[arg-type]
            outcome = _bind(spec)
        except BaseException as exc:  # handed to the loop below
            outcome = exc
        loop.call_soon_threadsafe(deliver, outcome)

    threading.Thread(target=work, name=f"netns-{spec.netns}", daemon=True).start()
    return await future
