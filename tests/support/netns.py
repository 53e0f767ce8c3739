"""Throw-away network namespaces for system tests, always deleted, named per run.

Addresses are link-local only (169.254.0.0/16): tests never touch private or public ranges.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
import socket
import subprocess
import threading
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


def _batch(commands: list[str], *, namespace: str | None = None, force: bool = False) -> None:
    """Run many `ip` commands in one process (`ip [-n NS] -batch -`)."""
    argv = ["ip", *(["-n", namespace] if namespace else []), *(["-force"] if force else [])]
    result = subprocess.run(
        [*argv, "-batch", "-"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0 and not force:
        raise RuntimeError(f"ip -batch failed: {result.stderr.strip()[:500]}")


def create_pairs(count: int, inst_ip: str = "169.254.10.2") -> list[Pair]:
    """`count` isolated pairs made with a few batched `ip` runs; the caller must `delete_pairs`.

    Every pair uses the same addresses: each lives in its own namespaces, so they never meet.
    """
    s = suffix()
    pairs = [
        Pair(
            net_ns=f"mp-net-{s}-{i}",
            inst_ns=f"mp-inst-{s}-{i}",
            net_if=f"mpn{s}{i:03d}",
            inst_if=f"mpi{s}{i:03d}",
            inst_ip=inst_ip,
        )
        for i in range(count)
    ]
    try:
        global_cmds: list[str] = []
        for p in pairs:
            global_cmds += [
                f"netns add {p.net_ns}",
                f"netns add {p.inst_ns}",
                f"link add {p.net_if} type veth peer name {p.inst_if}",
                f"link set {p.net_if} netns {p.net_ns}",
                f"link set {p.inst_if} netns {p.inst_ns}",
            ]
        _batch(global_cmds)
        for p in pairs:
            for ns, dev, address in (
                (p.net_ns, p.net_if, p.net_ip),
                (p.inst_ns, p.inst_if, p.inst_ip),
            ):
                _batch(
                    ["link set lo up", f"addr add {address}/16 dev {dev}", f"link set {dev} up"],
                    namespace=ns,
                )
    except BaseException:
        delete_pairs(pairs)
        raise
    return pairs


def delete_pairs(pairs: list[Pair]) -> None:
    """Delete every namespace of `pairs` (one `ip -force -batch`; missing ones are fine)."""
    _batch(
        [f"netns del {ns}" for p in pairs for ns in (p.inst_ns, p.net_ns)],
        force=True,
    )


@contextlib.contextmanager
def netns_pair(tag: str | None = None, inst_ip: str = "169.254.10.2") -> Iterator[Pair]:
    pair = create_pair(tag, inst_ip)
    try:
        yield pair
    finally:
        delete_pair(pair)


def _enter(ns: str) -> None:
    """setns(2) the calling thread into /run/netns/NS (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    finally:
        os.close(fd)


def _sockaddr(address: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """`address` may be IPv6 with a scope (`fe80::2%eth0`), resolved in this namespace."""
    if ":" not in address:
        return (address, port)
    host, _, scope = address.partition("%")
    return (host, port, 0, socket.if_nametoindex(scope) if scope else 0)


def connect_from(
    ns: str, source: str, host: str, port: int, *, timeout: float = 10
) -> socket.socket:
    """A TCP connection made inside namespace `ns` from address `source` (blocking, timeout).

    A short-lived thread enters the namespace; the socket keeps it after the thread ends.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    outcome: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            _enter(ns)  # first: a socket belongs to the namespace it is created in
            sock = socket.socket(family, socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
            return
        try:
            sock.settimeout(timeout)
            sock.bind(_sockaddr(source, 0))
            sock.connect(_sockaddr(host, port))
            outcome.append(sock)
        except BaseException as exc:  # handed to the caller
            sock.close()
            outcome.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result
