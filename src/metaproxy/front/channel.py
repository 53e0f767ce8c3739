"""The channel between the manager and a front worker: a SOCK_SEQPACKET pair carrying messages
and file descriptors (listening sockets one way, agent connections the other).

The two directions are not equal. The worker parses guest traffic, so the manager treats it as
compromisable: what the worker says is JSON, size-capped and validated, and never unpickled.
The worker trusts its manager, which sends pickles (a FrontSpec and the engine's options as
they are). Each message is one datagram; an empty read is the other side's end.
"""

from __future__ import annotations

import json
import pickle
import socket
from typing import Any

MAX_MESSAGE = 256 * 1024
_MAX_FDS = 1


class ChannelError(Exception):
    """A message that breaks the channel's rules (truncated, malformed, too many fds)."""


def pair() -> tuple[socket.socket, socket.socket]:
    """(manager end, worker end), both close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _send(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    if len(payload) > MAX_MESSAGE:
        raise ChannelError(f"message of {len(payload)} bytes is over {MAX_MESSAGE}")
    socket.send_fds(sock, [payload], fds)


def _receive(sock: socket.socket) -> tuple[bytes, list[socket.socket]] | None:
    """One message and the sockets it carried, None at the end; BlockingIOError when empty."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, _MAX_FDS)
    received = [socket.socket(fileno=fd) for fd in fds]
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for s in received:
            s.close()
        raise ChannelError("message or descriptors truncated")
    if not data and not received:
        return None
    return data, received


# -- manager → worker -------------------------------------------------------------------------


def send_order(sock: socket.socket, order: dict[str, Any], fds: list[int] | None = None) -> None:
    _send(sock, pickle.dumps(order), fds or [])


def receive_order(sock: socket.socket) -> tuple[dict[str, Any], list[socket.socket]] | None:
    got = _receive(sock)
    if got is None:
        return None
    data, received = got
    order = pickle.loads(data)  # noqa: S301 - only ever from our own manager (module doc)
    if not isinstance(order, dict):
        raise ChannelError("order is not a mapping")
    return order, received


# -- worker → manager -------------------------------------------------------------------------


def send_report(sock: socket.socket, report: dict[str, Any]) -> None:
    _send(sock, json.dumps(report, separators=(",", ":")).encode(), [])


def receive_report(sock: socket.socket) -> dict[str, Any] | None:
    """A worker's message as a dict with a string "op"; ChannelError for anything else."""
    got = _receive(sock)
    if got is None:
        return None
    data, received = got
    if received:
        for s in received:
            s.close()
        raise ChannelError("a worker sent file descriptors")
    try:
        report = json.loads(data)
    except ValueError as exc:
        raise ChannelError(f"worker sent malformed JSON: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("op"), str):
        raise ChannelError("worker message without an op")
    return report
