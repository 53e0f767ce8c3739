"""`config.load`: the composed config of `metaproxy up`, overrides, and errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from metaproxy import config
from metaproxy.errors import ConfigError
from metaproxy.service.settings import Config, MetricsEndpoint, compose, describe

STATE = "/var/lib/mp-test"


def _compose(doc: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    base = {"service": {"state_path": STATE}}
    merged = {**base, **doc, "service": {**base["service"], **doc.get("service", {})}}
    return compose(merged, environ or {}, None)


def test_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, {})
    expected = Path("/var/lib/metaproxy")
    assert cfg.service.state_path == expected
    assert cfg.service.engine == "builtin"
    assert cfg.service.metrics is None
    assert cfg.service.metadata_url is None
    assert cfg.service.control_path == expected / "control.sock"
    assert cfg.fronts == ()


def test_file_with_networks_and_routers(tmp_path: Path) -> None:
    path = tmp_path / "metaproxy.toml"
    path.write_text(
        f"""
[service]
state_path = "{STATE}"
engine = "haproxy"
metrics = "127.0.0.1:9464"

[front]
timeout_client = 10
maxconn = 200

[agent]
cache_ttl = 5

[[network]]
id = "net-a"
netns = "ns-a"

[[network]]
id = "net-b"
bind_address = "169.254.169.254"
port = 8080

[[router]]
id = "r1"
"""
    )
    cfg = config.load(path, {})
    assert cfg.service.engine == "haproxy"
    assert cfg.service.metrics == MetricsEndpoint(host="127.0.0.1", port=9464)
    assert cfg.front.timeouts.client == 10.0
    assert cfg.section("agent") == {"cache_ttl": 5}
    names = [(e.name, e.netns) for e in cfg.fronts]
    assert names == [
        ("network-net-a", "ns-a"),
        ("network-net-b", "qdhcp-net-b"),
        ("router-r1", "qrouter-r1"),
    ]
    specs = [e.spec(cfg.service, cfg.front) for e in cfg.fronts]
    assert [(s.bind_address, s.port) for s in specs] == [
        ("169.254.169.254", 80),
        ("169.254.169.254", 8080),
        ("0.0.0.0", 9697),
    ]
    assert specs[0].upstream_socket == Path(STATE) / "metadata_proxy"
    assert specs[0].maxconn == 200


def test_netns_templates_name_store_fronts() -> None:
    cfg = _compose({"front": {"network_netns": "ovnmeta-{id}"}, "network": [{"id": "n1"}]})
    assert cfg.fronts[0].netns == "ovnmeta-n1"
    assert cfg.front.netns_for("router", "r1") == "qrouter-r1"


def test_environment_overrides_the_file() -> None:
    cfg = _compose(
        {"service": {"engine": "haproxy"}},
        {
            "METAPROXY_SERVICE__ENGINE": "builtin",
            "METAPROXY_SERVICE__LOG_LEVEL": "debug",
            "METAPROXY_FRONT__MAXCONN": "77",
            "METAPROXY_AGENT__CACHE_TTL": "9",
        },
    )
    assert cfg.service.engine == "builtin"
    assert cfg.service.log_level == "DEBUG"
    assert cfg.front.maxconn == 77
    assert cfg.section("agent") == {"cache_ttl": "9"}


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        pytest.param({"service": {"engine": "nginx"}}, "service.engine", id="engine"),
        pytest.param({"service": {"bogus": 1}}, "service.bogus", id="unknown-key"),
        pytest.param({"servise": {}}, "servise", id="unknown-section"),
        pytest.param({"service": {"stop_timeout": "soon"}}, "service.stop_timeout", id="float"),
        pytest.param({"service": {"metrics": "localhost"}}, "service.metrics", id="metrics"),
        pytest.param({"service": {"metrics": "unix:rel"}}, "service.metrics", id="metrics-rel"),
        pytest.param({"service": {"metadata_url": "ftp://x"}}, "service.metadata_url", id="url"),
        pytest.param(
            {"service": {"metadata_url": "http://127.0.0.1:8775"}},
            "service.shared_secret",
            id="nova-needs-secret",
        ),
        pytest.param({"front": {"port": 0}}, "front.port", id="front-port"),
        pytest.param(
            {"service": {"state_path": "/" + "d" * 100}}, "service.state_path", id="long-state"
        ),
        pytest.param({"front": {"user": "no-such-user-xyz"}}, "front.user", id="front-user"),
        pytest.param({"network": [{}]}, "network[0].id", id="missing-id"),
        pytest.param({"network": [{"id": "a\nb"}]}, "network[0].id", id="id-injection"),
        pytest.param({"network": [{"id": "n", "netns": "a/b"}]}, "network[0].netns", id="netns"),
        pytest.param(
            {"router": [{"id": "r", "bind_address": "x"}]}, "router[0].bind_address", id="addr"
        ),
        pytest.param({"network": [{"id": "n", "prot": 1}]}, "network[0].prot", id="typo"),
        pytest.param({"network": [{"id": "n"}, {"id": "n"}]}, "network[1].id", id="duplicate"),
        pytest.param(
            {"network": [{"id": "n", "interface": "x" * 16}]},
            "network[0].interface",
            id="iface-too-long",
        ),
        pytest.param({"network": {"id": "n"}}, "network", id="not-an-array"),
        pytest.param({"front": {"network_netns": "ns"}}, "front.network_netns", id="no-id"),
        pytest.param(
            {"front": {"max_conn_per_source": 0}}, "front.max_conn_per_source", id="per-source-0"
        ),
        pytest.param({"front": {"pipeline": 0}}, "front.pipeline", id="pipeline-0"),
        pytest.param({"front": {"pipeline": 65}}, "front.pipeline", id="pipeline-65"),
        pytest.param({"front": {"pipeline": "deep"}}, "front.pipeline", id="pipeline-word"),
        pytest.param(
            {"metadata_rate_limiting": {"rate_limit": True}},
            "metadata_rate_limiting.rate_limit",
            id="rate-typo",
        ),
        pytest.param(
            {"metadata_rate_limiting": {"base_query_rate_limit": "ten"}},
            "metadata_rate_limiting.base_query_rate_limit",
            id="rate-not-a-number",
        ),
        pytest.param(
            {"metadata_rate_limiting": {"burst_window_duration": 0}},
            "metadata_rate_limiting.burst_window_duration",
            id="rate-zero-window",
        ),
        pytest.param(
            {"metadata_rate_limiting": {"rate_limit_enabled": "maybe"}},
            "metadata_rate_limiting.rate_limit_enabled",
            id="rate-not-a-bool",
        ),
        pytest.param(
            {"front": {"router_netns": "{id}-{x}"}}, "front.router_netns", id="other-placeholder"
        ),
    ],
)
def test_errors_name_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _compose(doc)
    assert info.value.key == key
    assert key.split(".")[-1].split("[")[0] in str(info.value)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[service\n")
    with pytest.raises(ConfigError, match=str(path)):
        config.load(path, {})


def test_secret_from_file_is_masked_everywhere(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("hunter2-very-secret\n")
    cfg = _compose(
        {
            "service": {"shared_secret_file": str(secret_file)},
            "agent": {"metadata_proxy_shared_secret": "also-secret"},
        }
    )
    assert cfg.service.shared_secret.reveal() == "hunter2-very-secret"
    text = repr(cfg) + repr(describe(cfg))
    assert "hunter2" not in text
    assert "also-secret" not in repr(describe(cfg))


def test_a_previously_generated_secret_is_reused(tmp_path: Path) -> None:
    (tmp_path / "shared_secret").write_text("generated-before\n")
    cfg = compose({"service": {"state_path": str(tmp_path)}}, {}, None)
    assert cfg.service.shared_secret.reveal() == "generated-before"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("off", None),
        ("127.0.0.1:9464", MetricsEndpoint(host="127.0.0.1", port=9464)),
        ("[::1]:9464", MetricsEndpoint(host="::1", port=9464)),
        ("unix:/run/mp/metrics.sock", MetricsEndpoint(path=Path("/run/mp/metrics.sock"))),
    ],
)
def test_metrics_endpoint(text: str, expected: MetricsEndpoint | None) -> None:
    assert MetricsEndpoint.parse(text) == expected


def test_the_example_config_in_contrib_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "contrib" / "metaproxy.toml.example"
    cfg = config.load(example, {})
    assert [e.name for e in cfg.fronts] == [
        "network-6e6b1a54-3a3f-4d8d-8a39-4b0c0b3e2f11",
        "router-r1",
    ]


def test_rate_limits_take_neutrons_section_and_names() -> None:
    cfg = _compose(
        {
            "front": {"max_conn_per_source": 16},
            "metadata_rate_limiting": {
                "rate_limit_enabled": True,
                "ip_versions": [4, 6],
                "base_window_duration": 30,
                "base_query_rate_limit": 20,
            },
        }
    )
    assert cfg.limits.max_conn_per_source == 16
    rate = cfg.limits.rate_limit
    assert rate.rate_limit_enabled
    assert rate.ip_versions == (4, 6)
    assert (rate.base_window_duration, rate.base_query_rate_limit) == (30.0, 20)
    assert rate.burst_query_rate_limit == 10  # Neutron's default
    shown = describe(cfg)
    assert shown["front"]["max_conn_per_source"] == 16
    assert shown["metadata_rate_limiting"]["ip_versions"] == [4, 6]


def test_pipeline_depth_reaches_the_engine_options() -> None:
    from metaproxy.service.engines import create

    assert _compose({}).front.pipeline == 8
    cfg = _compose({"front": {"pipeline": 3, "isolate": False}})
    assert describe(cfg)["front"]["pipeline"] == 3
    engine = create(cfg)
    assert engine.front.options.pipeline == 3  # type: ignore[attr-defined]


def test_rate_limits_are_off_by_default_and_take_environment_strings() -> None:
    assert not _compose({}).limits.rate_limit.rate_limit_enabled
    assert _compose({}).limits.max_conn_per_source == 64
    cfg = _compose(
        {},
        {
            "METAPROXY_METADATA_RATE_LIMITING__RATE_LIMIT_ENABLED": "true",
            "METAPROXY_METADATA_RATE_LIMITING__BURST_QUERY_RATE_LIMIT": "4",
            "METAPROXY_METADATA_RATE_LIMITING__IP_VERSIONS": "6",
            "METAPROXY_FRONT__MAX_CONN_PER_SOURCE": "9",
        },
    )
    assert cfg.limits.rate_limit.rate_limit_enabled is True
    assert cfg.limits.rate_limit.burst_query_rate_limit == 4
    assert cfg.limits.rate_limit.ip_versions == (6,)
    assert cfg.limits.max_conn_per_source == 9


def test_both_engines_under_up_get_the_limits() -> None:
    """The limits reach the engine `up` builds, whichever it is (they were ignored before)."""
    from metaproxy.service import engines
    from metaproxy.service.haproxy_engine import HaproxyEngine

    doc = {
        "front": {"max_conn_per_source": 5},
        "metadata_rate_limiting": {"rate_limit_enabled": True, "base_query_rate_limit": 7},
    }
    builtin = engines.create(_compose(doc))
    assert isinstance(builtin, engines.BuiltinEngine)
    assert builtin.front.options.max_conn_per_source == 5
    assert builtin.front.options.rate_limit.base_query_rate_limit == 7
    haproxy = HaproxyEngine.from_config(_compose({**doc, "service": {"engine": "haproxy"}}))
    assert haproxy.settings.limits.max_conn_per_source == 5
    assert haproxy.settings.limits.rate_limit.base_query_rate_limit == 7
