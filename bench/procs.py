"""Child processes of a benchmark run: started in their own session, always stopped."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class BenchError(Exception):
    """A benchmark could not run (a system failed to start, a tool is missing)."""


class Child:
    """One started program: its output goes to a log file, stop() always ends it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logdir: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        pipes: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("ab")
        # pipes=True: a line protocol on stdin/stdout (text); stderr still goes to the log.
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else self._log,
            stderr=self._log if pipes else subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def problems(self, top: int = 3) -> list[str]:
        """The most frequent WARNING/ERROR messages in the log, with their counts."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        seen: collections.Counter[str] = collections.Counter()
        for line in text.splitlines():
            for level in (" WARNING ", " ERROR ", " CRITICAL "):
                if level in line:
                    message = line.split(level, 1)[1]
                    seen[re.sub(r"\d+(\.\d+)*", "N", message)[:160]] += 1
        return [f"{n}x {m}" for m, n in seen.most_common(top)]

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}"
            )

    def read_line(self, timeout: float) -> str:
        """The next stdout line of a pipes=True child, or "" after `timeout` s or at its end."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL the process group this child leads."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()


def wait_until(what: str, ready: Callable[[], bool], timeout: float, child: Child | None) -> None:
    """Poll `ready` until it is true; fail early if `child` died, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None:
            child.check_alive()
        if ready():
            return
        time.sleep(0.05)
    tail = f":\n{child.log_tail()}" if child is not None else ""
    raise BenchError(f"{what} not ready within {timeout:g} s{tail}")


def tcp_ready(host: str, port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return probe


def unix_ready(path: Path) -> Callable[[], bool]:
    def probe() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect(str(path))
            except OSError:
                return False
            return True

    return probe


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_get(host: str, port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET with Connection: close, for readiness checks: (status, body)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body
