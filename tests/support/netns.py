"""Throw-away network namespaces for system tests, always deleted, named per run.

Addresses are link-local only (169.254.0.0/16): tests never touch private or public ranges.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

METADATA_IP = "169.254.169.254"

requires_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 for network namespaces (CI runs as root with iproute2)",
)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS` with a timeout; raise with ip's stderr when it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def in_ns(ns: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run argv inside namespace `ns` and return its result (never raises on exit status)."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def suffix() -> str:
    return secrets.token_hex(3)


@dataclass(frozen=True)
class Pair:
    """A network namespace (where the front listens) and an instance namespace on one veth."""

    net_ns: str
    inst_ns: str
    net_if: str
    inst_if: str
    inst_ip: str
    net_ip: str = METADATA_IP

    def curl(self, url: str, *extra: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """curl from the instance side; -s, a bounded time, status code on the last line."""
        return in_ns(
            self.inst_ns,
            "curl",
            "-sS",
            "--max-time",
            str(timeout),
            "-w",
            "\n%{http_code}",
            *extra,
            url,
            timeout=timeout + 5,
        )


def create_pair(tag: str | None = None, inst_ip: str = "169.254.10.2") -> Pair:
    """Create the two namespaces and their veth; the caller must call `delete_pair`."""
    s = tag or suffix()
    pair = Pair(
        net_ns=f"mp-net-{s}",
        inst_ns=f"mp-inst-{s}",
        net_if=f"mpn{s}"[:15],
        inst_if=f"mpi{s}"[:15],
        inst_ip=inst_ip,
    )
    try:
        ip("netns", "add", pair.net_ns)
        ip("netns", "add", pair.inst_ns)
        ip("link", "add", pair.net_if, "type", "veth", "peer", "name", pair.inst_if)
        ip("link", "set", pair.net_if, "netns", pair.net_ns)
        ip("link", "set", pair.inst_if, "netns", pair.inst_ns)
        ip("-n", pair.net_ns, "link", "set", "lo", "up")
        ip("-n", pair.inst_ns, "link", "set", "lo", "up")
        ip("-n", pair.net_ns, "addr", "add", f"{pair.net_ip}/16", "dev", pair.net_if)
        ip("-n", pair.inst_ns, "addr", "add", f"{pair.inst_ip}/16", "dev", pair.inst_if)
        ip("-n", pair.net_ns, "link", "set", pair.net_if, "up")
        ip("-n", pair.inst_ns, "link", "set", pair.inst_if, "up")
    except BaseException:
        delete_pair(pair)
        raise
    return pair


def delete_pair(pair: Pair) -> None:
    """Delete both namespaces (their veth ends go with them); ignore ones already gone."""
    for ns in (pair.inst_ns, pair.net_ns):
        ip("netns", "del", ns, check=False)


@contextlib.contextmanager
def netns_pair(tag: str | None = None, inst_ip: str = "169.254.10.2") -> Iterator[Pair]:
    pair = create_pair(tag, inst_ip)
    try:
        yield pair
    finally:
        delete_pair(pair)
