"""Run `metaproxy up` as a real process over real namespaces, and check what it leaves behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import cli, netns

CURL_TIMEOUT = 5.0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.2) -> None:
    """Poll `predicate` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
            last = ""
        except AssertionError as exc:  # e.g. the front is not in the status yet
            last = f" (last: {exc})"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{last}")
        time.sleep(step)


@dataclass
class Stack:
    """One running `metaproxy up` and the namespaces/instances the test gave it."""

    state: Path
    config: Path
    engine: str
    proc: subprocess.Popen[str] | None = None
    stderr: str = ""
    pairs: dict[str, netns.Pair] = field(default_factory=dict)
    instances: dict[str, str] = field(default_factory=dict)  # network id → instance uuid

    def start(self, *extra: str, environ: dict[str, str] | None = None) -> None:
        """`metaproxy up --config CONFIG *extra`; `environ`: more environment variables."""
        self.proc = cli.popen(
            "up",
            "--config",
            str(self.config),
            *extra,
            stdout=subprocess.PIPE,
            env=cli.env(**(environ or {})),
        )

    def status(self) -> dict[str, Any]:
        result = cli.run("status", "--json", "--config", str(self.config), timeout=30)
        if not result.stdout.strip():
            raise AssertionError(f"status failed: {result.stderr}")
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def front(self, network_id: str) -> dict[str, Any]:
        for row in self.status()["fronts"]:
            if row["id"] == network_id:
                return dict(row)
        raise AssertionError(f"no front for {network_id}")

    def running(self, *network_ids: str) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"metaproxy up exited with {self.proc.returncode}: {err}")
        try:
            fronts = {f["id"]: f["state"] for f in self.status()["fronts"]}
        except (AssertionError, ValueError):
            return False
        return all(fronts.get(n) == "running" for n in network_ids)

    def wait_running(self, *network_ids: str, timeout: float = 60) -> None:
        wait_for(lambda: self.running(*network_ids), timeout, f"fronts {network_ids} to serve")

    def get(self, network_id: str, path: str) -> tuple[int, str]:
        """curl http://169.254.169.254<path> from that network's instance namespace."""
        result = self.pairs[network_id].curl(f"http://{netns.METADATA_IP}{path}", timeout=5)
        body, _, code = result.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def serves(self, network_id: str) -> bool:
        return self.get(network_id, "/openstack/latest/meta_data.json")[0] == 200

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit status and keeps stderr for assertions."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate(timeout=10)
            raise AssertionError("metaproxy up did not stop after SIGTERM") from None
        return self.proc.returncode

    def discard(self) -> None:
        """Whatever happened: kill the service if it still runs and delete the namespaces."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)
        for pair in self.pairs.values():
            netns.delete_pair(pair)


def leftovers(state: Path) -> list[str]:
    """What a stopped stack must not leave: sockets, pidfiles, haproxy configs, processes."""
    found = []
    for path in state.rglob("*"):
        if path.is_socket() or path.suffix in (".pid", ".conf", ".sock"):
            found.append(str(path))
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(state).encode() in part for part in argv) and int(pid_dir.name) != os.getpid():
            found.append(f"process {pid_dir.name}: {b' '.join(argv).decode(errors='replace')}")
    return found
