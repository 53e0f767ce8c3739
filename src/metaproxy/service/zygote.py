"""The zygote: a process forked before `metaproxy up` reads its config, to fork front workers.

A worker forked from the manager itself would carry a copy of everything the manager holds —
the shared secret above all — into the process that parses guest traffic. So `up` forks this
zygote first thing, while its memory holds nothing but the program; every front worker is
forked from it later, on the manager's request:

    zygote = Zygote.start()               # first thing in `up`, before the config is read
    pid = zygote.spawn(worker_end, uid, gid)
    zygote.close()                        # at the very end

`spawn` hands over one end of the worker's channel (front/channel.py); the zygote forks, the
child drops to `uid`/`gid` (from root), makes itself non-dumpable (no ptrace, /proc files of it
owned by root) and runs `front.worker.run` on that channel. The zygote reaps its children; the
manager sees a worker end when the worker's channel closes. The zygote dies with the manager
(and its workers with it: PR_SET_PDEATHSIG); they ignore SIGINT, SIGHUP and SIGTERM, so a
Ctrl-C or a signal to the whole group leaves the stopping (and draining) to the manager.

The environment is the one `up` started with: a secret given as METAPROXY_SERVICE__SHARED_SECRET
(or any variable whose name says secret, password, token, key, credential or auth, such as an
operator's OS_PASSWORD) would be in the zygote's memory twice — the process's environment block
and Python's copy of it. The zygote
overwrites both before it forks anything, so no worker carries it (the secret file, the
default, was never in its memory).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import posix
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from metaproxy import forking
from metaproxy.errors import ProcessError
from metaproxy.front import channel

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_SPAWN_TIMEOUT = 10.0
_BYTES_DATA_OFFSET = sys.getsizeof(b"") - 1  # where a bytes object's characters start


class Zygote:
    """The manager's handle on the zygote process (see the module docstring)."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.returncode: int | None = None

    @classmethod
    def start(cls) -> Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()

        def main() -> int:  # pragma: no cover - the child (the tests watch it from outside)
            ours.close()
            forking.die_with_parent(parent, signal.SIGKILL)
            return _serve(theirs)

        pid = forking.fork(main, _current_mask(), label="front worker zygote")
        theirs.close()
        return cls(pid, ours)

    def spawn(self, worker_end: socket.socket, uid: int | None, gid: int | None) -> int:
        """Fork a front worker on `worker_end` as uid/gid; its pid. ProcessError on failure."""
        try:
            channel.send_order(self.sock, {"uid": uid, "gid": gid}, [worker_end.fileno()])
            ready, _, _ = select.select([self.sock], [], [], _SPAWN_TIMEOUT)
            reply = self.sock.recv(4096) if ready else b""
        except OSError as exc:
            raise ProcessError(f"front worker zygote: {exc.strerror or exc}") from exc
        if not reply:
            raise ProcessError("front worker zygote did not answer (it is gone)")
        answer = json.loads(reply)
        if "pid" not in answer:
            raise ProcessError(f"front worker zygote: {answer.get('error', 'no pid')}")
        return int(answer["pid"])

    def alive(self) -> bool:
        """False once the zygote has exited (it is our child: waitpid tells)."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode is None

    def close(self, timeout: float = 5.0) -> None:
        """End the zygote (it exits when its channel closes) and wait for it."""
        self.sock.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return
            time.sleep(0.02)
        log.warning("front worker zygote %d did not exit; killing it", self.pid)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def _current_mask() -> set[int | signal.Signals]:
    return signal.pthread_sigmask(signal.SIG_BLOCK, [])


_SECRET_WORDS = (b"secret", b"password", b"passwd", b"token", b"key", b"credential", b"auth")


def secretish(name: bytes) -> bool:
    """An environment variable that may carry a secret: ours (METAPROXY_SERVICE__SHARED_SECRET)
    or anyone's (OS_PASSWORD, AWS_SECRET_ACCESS_KEY, ...). A worker needs none of them."""
    lowered = name.lower()
    return any(w in lowered for w in _SECRET_WORDS) and not lowered.endswith((b"_file", b"_path"))


def scrub_environment() -> list[str]:
    """Overwrite the values of secret-like variables in this process's memory (see the
    module docstring); the names scrubbed. Call it in the zygote only: the manager needs them.
    """
    scrubbed = []
    # 1. The environment block the kernel placed on the stack (also /proc/PID/environ).
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    env_start, env_end = int(fields[47]), int(fields[48])  # stat fields 50 and 51
    block = ctypes.string_at(env_start, env_end - env_start)  # a copy: wiped below
    try:
        pos = 0
        while pos < len(block):
            end = block.find(b"\0", pos)
            end = len(block) if end < 0 else end
            equals = block.find(b"=", pos, end)
            if equals > pos and end > equals + 1 and secretish(block[pos:equals]):
                ctypes.memset(env_start + equals + 1, ord("*"), end - equals - 1)
                scrubbed.append(block[pos:equals].decode(errors="replace"))
            pos = end + 1
    finally:
        _wipe(block)
    # 2. Python's copy (posix.environ, which os.environ wraps): its bytes, in place.
    for name, value in list(posix.environ.items()):
        if value and secretish(name):
            _wipe(value)
    return scrubbed


def _wipe(data: bytes) -> None:
    """Overwrite a bytes object's characters in place (it must hold nothing anyone reads)."""
    ctypes.memset(id(data) + _BYTES_DATA_OFFSET, ord("*"), len(data))


def _serve(sock: socket.socket) -> int:
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    scrub_environment()
    me = os.getpid()
    children: set[int] = set()
    while True:
        forking.reap(children)
        ready, _, _ = select.select([sock], [], [], 1.0)
        if not ready:
            continue
        got = channel.receive_order(sock)  # from the manager only (front/channel.py)
        if got is None:
            return 0  # the manager closed the channel: the end
        order, sockets = got
        if len(sockets) != 1:
            for extra in sockets:
                extra.close()
            sock.send(json.dumps({"error": "spawn needs one channel"}).encode())
            continue
        channel_end = sockets[0]

        main = functools.partial(_become_worker, me, sock, channel_end, order)
        try:
            pid = forking.fork(main, _current_mask(), label="front worker")
        except OSError as exc:
            sock.send(json.dumps({"error": f"fork: {exc.strerror}"}).encode())
            continue
        finally:
            channel_end.close()
        children.add(pid)
        sock.send(json.dumps({"pid": pid}).encode())


def _become_worker(
    zygote: int, zygote_end: socket.socket, channel_end: socket.socket, order: dict[str, Any]
) -> int:  # pragma: no cover - runs in the worker
    zygote_end.close()
    from metaproxy.front.process import drop_privileges
    from metaproxy.front.worker import run

    drop_privileges(order["uid"], order["gid"])
    # Signals stay ignored (from the zygote): the manager drains and stops its workers itself,
    # and if the manager dies, the zygote dies and takes every worker with it. After the drop:
    # changing credentials clears PDEATHSIG.
    forking.die_with_parent(zygote, signal.SIGKILL)
    forking.prctl(_PR_SET_DUMPABLE, 0)
    forking.prctl(_PR_SET_NO_NEW_PRIVS, 1)  # nothing it could exec regains privilege
    return run(channel_end)
