"""The store's read side that the agent's lookup depends on: the seam between agent and store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PortMatch:
    """One port that matched a lookup, with the instance and project that own it."""

    port_id: str
    network_id: str
    instance_id: str
    project_id: str


class PortDirectory(Protocol):
    """Read-only lookups the agent needs; implemented by the SQLite store (and any later one).

    Every method returns *all* matches: the agent, not the store, decides that zero or several
    is an error (404), so no backend can guess or fall back to a default identity.
    """

    def ports_by_ip(self, network_ids: Sequence[str], ip: str) -> list[PortMatch]:
        """Ports on any of `network_ids` with fixed IP `ip` (canonical text form)."""
        ...

    def ports_by_mac(self, network_ids: Sequence[str], mac: str) -> list[PortMatch]:
        """Ports on any of `network_ids` with MAC `mac` (lower-case, colon-separated)."""
        ...

    def router_networks(self, router_id: str) -> list[str]:
        """IDs of the networks attached to `router_id` (empty when the router is unknown)."""
        ...
