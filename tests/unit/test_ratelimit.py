"""Neutron-style rate limiting with a fake clock: base and burst windows, per source."""

from __future__ import annotations

import pytest

from metaproxy.errors import ConfigError
from metaproxy.front.ratelimit import RateLimitConfig, RateLimiter, SourceLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(**options: object) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    config = RateLimitConfig(rate_limit_enabled=True, **options)  # type: ignore[arg-type]
    return RateLimiter(config, clock), clock


def test_base_window_allows_the_limit_then_refuses() -> None:
    rl, _ = limiter(base_query_rate_limit=3, burst_query_rate_limit=100)
    assert [rl.allow("169.254.0.2") for _ in range(5)] == [True, True, True, False, False]


def test_sources_are_counted_apart() -> None:
    rl, _ = limiter(base_query_rate_limit=1, burst_query_rate_limit=100)
    assert rl.allow("169.254.0.2")
    assert rl.allow("169.254.0.3")
    assert not rl.allow("169.254.0.2")


def test_burst_window_is_checked_too() -> None:
    rl, clock = limiter(
        base_query_rate_limit=100,
        base_window_duration=60,
        burst_query_rate_limit=2,
        burst_window_duration=1,
    )
    assert [rl.allow("a") for _ in range(3)] == [True, True, False]
    clock.now += 2.5  # two burst periods later the burst estimate is empty again
    assert rl.allow("a")


def test_sliding_estimate_weights_the_previous_period() -> None:
    rl, clock = limiter(base_query_rate_limit=10, base_window_duration=10)
    for _ in range(10):
        assert rl.allow("a")
    clock.now += 15  # half of the previous period still overlaps: 10 * 0.5 + new hits
    allowed = [rl.allow("a") for _ in range(6)]
    assert allowed == [True, True, True, True, True, False]


def test_only_configured_ip_versions_are_limited() -> None:
    rl, _ = limiter(ip_versions=(4,))
    assert rl.applies_to(4)
    assert not rl.applies_to(6)
    off = RateLimiter(RateLimitConfig())
    assert not off.applies_to(4)


@pytest.mark.parametrize(
    "table",
    [
        pytest.param({"ip_versions": "5"}, id="bad-ip-version"),
        pytest.param({"base_window_duration": 0}, id="zero-window"),
        pytest.param({"burst_query_rate_limit": 0}, id="zero-limit"),
        pytest.param({"rate_limit": True}, id="unknown-key"),
    ],
)
def test_bad_options_are_config_errors(table: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RateLimitConfig.from_mapping(table)


def test_options_from_a_mapping() -> None:
    config = RateLimitConfig.from_mapping({"rate_limit_enabled": True, "ip_versions": "4, 6"})
    assert config.ip_versions == (4, 6)
    assert config.base_query_rate_limit == 10


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param({"rate_limit_enabled": "true"}, {"rate_limit_enabled": True}, id="env-true"),
        pytest.param({"rate_limit_enabled": "0"}, {"rate_limit_enabled": False}, id="env-0"),
        pytest.param({"base_query_rate_limit": "12"}, {"base_query_rate_limit": 12}, id="int"),
        pytest.param({"burst_window_duration": "2.5"}, {"burst_window_duration": 2.5}, id="f"),
        pytest.param({"ip_versions": [6, 4]}, {"ip_versions": (6, 4)}, id="toml-list"),
    ],
)
def test_values_from_toml_and_environment_are_coerced(
    raw: dict[str, object], expected: dict[str, object]
) -> None:
    config = RateLimitConfig.from_mapping(raw)
    for name, value in expected.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        pytest.param({"rate_limit_enabled": "perhaps"}, "s.rate_limit_enabled", id="bool"),
        pytest.param({"base_query_rate_limit": True}, "s.base_query_rate_limit", id="bool-int"),
        pytest.param({"base_query_rate_limit": [1]}, "s.base_query_rate_limit", id="list"),
        pytest.param({"base_window_duration": -1}, "s.base_window_duration", id="negative"),
        pytest.param({"ip_versions": 4}, "s.ip_versions", id="not-a-list"),
    ],
)
def test_wrong_types_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RateLimitConfig.from_mapping(raw, section="s")
    assert info.value.key == key


def test_source_limits_from_flags_keep_defaults_for_absent_flags() -> None:
    flags = {"max_conn_per_source": None, "base_query_rate_limit": 3, "engine": "haproxy"}
    limits = SourceLimits.from_flags(flags)
    assert limits.max_conn_per_source == 64
    assert limits.rate_limit.base_query_rate_limit == 3
    assert not limits.rate_limit.rate_limit_enabled
    with pytest.raises(ConfigError):
        SourceLimits.from_flags({"max_conn_per_source": 0})
