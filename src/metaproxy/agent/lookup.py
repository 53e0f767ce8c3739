"""From (network | router, client address) to exactly one port, with a short-lived cache.

The registry reads only `metadata.records.PortDirectory`; zero or several matches is a 404
(ClientProtocolError with status_hint 404), never a guess or a default identity.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Protocol

from metaproxy.agent.identity import ClientKey
from metaproxy.errors import ClientProtocolError
from metaproxy.metadata.records import PortDirectory, PortMatch

DEFAULT_MAX_ENTRIES = 65536


class Registry(Protocol):
    """What the agent's request handler asks: the one port behind a client key."""

    def resolve(self, key: ClientKey, *, fresh: bool = False) -> tuple[PortMatch, bool]:
        """(the port, whether it came from the cache); `fresh` skips and refreshes the cache."""
        ...


class NotFound(ClientProtocolError):
    """No port, or more than one, matches: the instance gets a 404."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_hint=404)


def find_port(directory: PortDirectory, key: ClientKey) -> PortMatch:
    """Ask the directory once; exactly one match or NotFound."""
    if key.kind == "network":
        networks = [key.id]
    else:
        networks = directory.router_networks(key.id)
        if not networks:
            raise NotFound(f"router {key.id} has no networks")
    if key.mac is not None:
        matches = directory.ports_by_mac(networks, key.mac)
        what = f"MAC {key.mac}"
    elif _is_v6_link_local(key.ip):
        raise NotFound(f"link-local {key.ip} encodes no MAC (not EUI-64)")
    else:
        matches = directory.ports_by_ip(networks, key.ip)
        what = f"IP {key.ip}"
    if len(matches) != 1:
        raise NotFound(f"{len(matches)} ports with {what} on {key.kind} {key.id}")
    return matches[0]


def _is_v6_link_local(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.version == 6 and address.is_link_local


class PortRegistry:
    """A Registry over a PortDirectory with a TTL cache of positive answers.

    Only single matches are cached: a port that appears is found at once, and a port that moved
    is noticed when the metadata server answers 404 (the caller then asks with `fresh=True`).
    """

    def __init__(
        self,
        directory: PortDirectory,
        *,
        ttl: float = 30.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._cache: dict[ClientKey, tuple[float, PortMatch]] = {}
        self.lookups = 0
        self.hits = 0

    def resolve(self, key: ClientKey, *, fresh: bool = False) -> tuple[PortMatch, bool]:
        now = self._clock()
        if not fresh:
            entry = self._cache.get(key)
            if entry is not None and entry[0] > now:
                self.hits += 1
                return entry[1], True
        self.lookups += 1
        try:
            match = find_port(self._directory, key)
        except NotFound:
            self._cache.pop(key, None)
            raise
        if self._ttl > 0:
            if len(self._cache) >= self._max:
                self._evict(now)
            self._cache[key] = (now + self._ttl, match)
        return match, False

    def forget(self, key: ClientKey) -> None:
        self._cache.pop(key, None)

    def clear(self) -> None:
        self._cache.clear()

    def _evict(self, now: float) -> None:
        """Drop expired entries; if none expired, the oldest quarter (insertion order)."""
        expired = [k for k, (until, _) in self._cache.items() if until <= now]
        for k in expired or list(self._cache)[: max(1, self._max // 4)]:
            del self._cache[k]
