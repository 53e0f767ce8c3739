"""Many throw-away network namespaces, made and removed in bulk with `ip -batch`.

Names are `mp-b<random>-<n>`; only link-local addresses are used (169.254.169.254 on lo).
"""

from __future__ import annotations

import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.procs import BenchError

IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "/sbin/ip"
METADATA_IP = "169.254.169.254"


def _ip(args: list[str], stdin: str | None = None, timeout: float = 120) -> None:
    done = subprocess.run(
        [IP, *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"ip {' '.join(args)} failed: {done.stderr.strip()[:500]}")


class Namespaces:
    """`count` namespaces, each with lo up and 169.254.169.254/32 on it; `delete()` removes all."""

    def __init__(self, count: int) -> None:
        tag = secrets.token_hex(3)
        self.names = [f"mp-b{tag}-{i}" for i in range(count)]
        self.created: list[str] = []

    def create(self) -> Namespaces:
        try:
            # One ip process makes them all (much faster than an `ip netns add` each).
            _ip(["-batch", "-"], "".join(f"netns add {n}\n" for n in self.names))
            self.created = list(self.names)
            script = f"link set lo up\naddr add {METADATA_IP}/32 dev lo\n"
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda n: _ip(["-n", n, "-batch", "-"], script), self.names))
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Delete every namespace this object made, even after a partial failure."""
        existing = (
            {p.name for p in Path("/run/netns").iterdir()} if Path("/run/netns").exists() else set()
        )
        names = [n for n in self.names if n in existing]
        if names:
            # -force: keep going past a namespace that is already gone.
            _ip(["-force", "-batch", "-"], "".join(f"netns del {n}\n" for n in names))
        self.created = []

    def __enter__(self) -> Namespaces:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()
