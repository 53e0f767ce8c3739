"""Per-source request rate limiting with Neutron's options (`[metadata_rate_limiting]`).

A request is refused with 429 when its source's rate over the base window exceeds
`base_query_rate_limit`, or its rate over the (usually shorter) burst window exceeds
`burst_query_rate_limit`. Rates are sliding-window estimates the way haproxy's
`http_req_rate` computes them: this period's count plus the previous period's, weighted by how
much of it still overlaps the window. Every request counts, refused ones too, like a stick table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from metaproxy.errors import ConfigError

_PRUNE_EVERY = 1024


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Neutron's option names and defaults (off unless `rate_limit_enabled`)."""

    rate_limit_enabled: bool = False
    ip_versions: tuple[int, ...] = (4,)
    base_window_duration: float = 10.0
    base_query_rate_limit: int = 10
    burst_window_duration: float = 10.0
    burst_query_rate_limit: int = 10

    def __post_init__(self) -> None:
        if not set(self.ip_versions) <= {4, 6} or not self.ip_versions:
            raise ConfigError("ip_versions must list 4 and/or 6", key="ip_versions")
        for name in ("base_window_duration", "burst_window_duration"):
            if not 0 < getattr(self, name) <= 86400:
                raise ConfigError(f"{name} must be in (0, 86400] s", key=name)
        for name in ("base_query_rate_limit", "burst_query_rate_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1", key=name)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], *, section: str = "") -> RateLimitConfig:
        """Build from a TOML table, flags or environment strings; unknown keys and values of
        the wrong type are a ConfigError naming the key (`section.key` when given)."""
        where = f"{section}." if section else ""
        known = set(cls.__dataclass_fields__)
        unknown = set(table) - known
        if unknown:
            raise ConfigError(
                f"unknown rate limit option(s): {', '.join(where + k for k in sorted(unknown))}",
                key=where + sorted(unknown)[0],
            )
        values: dict[str, Any] = {}
        for name, raw in table.items():
            key = where + name
            if name == "ip_versions":
                items = raw.split(",") if isinstance(raw, str) else raw
                try:
                    values[name] = tuple(int(str(v).strip()) for v in items)
                except (TypeError, ValueError):
                    raise ConfigError(f"{key} must list 4 and/or 6", key=key) from None
            elif name == "rate_limit_enabled":
                values[name] = _boolean(raw, key)
            else:
                kind = int if name.endswith("_limit") else float
                if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                    raise ConfigError(f"{key} must be a number", key=key)
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ConfigError(f"{key} must be a number, not {raw!r}", key=key) from None
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}", key=where + (exc.key or "")) from None


def _boolean(raw: object, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{key} must be true or false, not {raw!r}", key=key)


MAX_CONN_PER_SOURCE = 64


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """What one instance address may use, the same for both engines.

    `max_conn_per_source` concurrent connections (more are turned away: 429 from the builtin
    engine, a closed connection from haproxy) and Neutron's request-rate limits.
    """

    max_conn_per_source: int = MAX_CONN_PER_SOURCE
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.max_conn_per_source <= 1_000_000:
            raise ConfigError(
                "max_conn_per_source must be between 1 and 1000000", key="max_conn_per_source"
            )

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> SourceLimits:
        """From parsed ns-proxy flags (`vars(args)`): only our names are read, and a flag that
        was not given (None) keeps its default."""
        given = {k: v for k, v in values.items() if v is not None}
        rate = {k: given[k] for k in RateLimitConfig.__dataclass_fields__ if k in given}
        per_source = given.get("max_conn_per_source", MAX_CONN_PER_SOURCE)
        return cls(int(per_source), RateLimitConfig.from_mapping(rate))


class _Window:
    """A sliding-window rate estimate from two fixed periods."""

    __slots__ = ("count", "period", "previous", "start")

    def __init__(self, period: float, now: float) -> None:
        self.period = period
        self.start = now
        self.count = 0
        self.previous = 0

    def hit(self, now: float) -> float:
        """Count one event at `now` and return the estimated events in the last period."""
        elapsed = now - self.start
        if elapsed >= self.period:
            periods = int(elapsed // self.period)
            self.previous = self.count if periods == 1 else 0
            self.count = 0
            self.start += periods * self.period
            elapsed = now - self.start
        self.count += 1
        return self.count + self.previous * (1.0 - elapsed / self.period)


class RateLimiter:
    """Decides, per source address, whether one more request is allowed."""

    def __init__(
        self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._sources: dict[str, tuple[_Window, _Window]] = {}
        self._calls = 0

    def applies_to(self, ip_version: int) -> bool:
        return self.config.rate_limit_enabled and ip_version in self.config.ip_versions

    def allow(self, source: str) -> bool:
        """Record one request from `source`; False when it is over either limit."""
        now = self._clock()
        cfg = self.config
        windows = self._sources.get(source)
        if windows is None:
            windows = (
                _Window(cfg.base_window_duration, now),
                _Window(cfg.burst_window_duration, now),
            )
            self._sources[source] = windows
        self._calls += 1
        if self._calls % _PRUNE_EVERY == 0:
            self._prune(now)
        base = windows[0].hit(now)
        burst = windows[1].hit(now)
        return base <= cfg.base_query_rate_limit and burst <= cfg.burst_query_rate_limit

    def _prune(self, now: float) -> None:
        horizon = 2 * max(self.config.base_window_duration, self.config.burst_window_duration)
        stale = [s for s, (base, _) in self._sources.items() if now - base.start > horizon]
        for source in stale:
            del self._sources[source]
