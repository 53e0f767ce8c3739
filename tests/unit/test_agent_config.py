"""AgentConfig from metaproxy's [agent] table and from a Neutron metadata_agent.ini."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from metaproxy.agent.config import AgentConfig, is_neutron_ini, load
from metaproxy.config import Secret
from metaproxy.errors import ConfigError

NEUTRON_INI = """\
[DEFAULT]
# a typical file written by a deployment tool
debug = False
state_path = /var/lib/neutron
metadata_proxy_shared_secret = p%ss;w0rd
nova_metadata_host = 192.0.2.10
nova_metadata_port = 8775
nova_metadata_protocol = https
nova_metadata_insecure = false
auth_ca_cert = /etc/ssl/ca.pem
nova_client_cert = /etc/neutron/client.pem
nova_client_priv_key = /etc/neutron/client.key
metadata_proxy_socket = $state_path/metadata_proxy
metadata_proxy_socket_mode = group
metadata_workers = 2
metadata_backlog = 128

[AGENT]
report_interval = 30

[cache]
enabled = true
"""


def test_neutron_ini_is_recognised_and_mapped(tmp_path: Path) -> None:
    path = tmp_path / "metadata_agent.ini"
    path.write_text(NEUTRON_INI)
    assert is_neutron_ini(NEUTRON_INI)
    cfg = load(path, {})
    assert cfg.shared_secret == Secret("p%ss;w0rd")
    assert cfg.socket_path == Path("/var/lib/neutron/metadata_proxy")
    assert cfg.socket_mode == "group"
    assert (cfg.workers, cfg.backlog) == (2, 128)
    up = cfg.upstream
    assert (up.scheme, up.host, up.port, up.insecure) == ("https", "192.0.2.10", 8775, False)
    assert up.ca_cert == Path("/etc/ssl/ca.pem")
    assert (up.client_cert, up.client_key) == (
        Path("/etc/neutron/client.pem"),
        Path("/etc/neutron/client.key"),
    )
    assert up.url == "https://192.0.2.10:8775"


def test_neutron_ini_defaults_follow_neutron() -> None:
    cfg = AgentConfig.from_neutron_ini("[DEFAULT]\nmetadata_proxy_shared_secret = x\n")
    assert cfg.socket_path == Path("/var/lib/neutron/metadata_proxy")
    assert cfg.socket_mode == "deduce"
    assert cfg.backlog == 4096
    assert cfg.upstream.url == "http://127.0.0.1:8775"


def test_neutron_ini_with_pre_pike_nova_metadata_ip() -> None:
    cfg = AgentConfig.from_neutron_ini(
        "[DEFAULT]\nmetadata_proxy_shared_secret = x\nnova_metadata_ip = 198.51.100.7\n"
    )
    assert cfg.upstream.host == "198.51.100.7"


def test_toml_table_is_used(tmp_path: Path) -> None:
    path = tmp_path / "metaproxy.toml"
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    path.write_text(
        f"""
[agent]
socket = "/run/metaproxy/agent.sock"
socket_mode = "all"
shared_secret_file = "{secret_file}"
metadata_url = "unix:/run/metaproxy/metadata.sock"
cache_ttl = 5
backlog = 64
pipeline = 16

[store]
path = "/var/lib/metaproxy/metaproxy.db"
"""
    )
    assert not is_neutron_ini(path.read_text())
    cfg = load(path, {})
    assert cfg.shared_secret == Secret("from-file")
    assert cfg.socket_path == Path("/run/metaproxy/agent.sock")
    assert cfg.socket_mode_bits() == 0o666
    assert cfg.upstream.scheme == "unix"
    assert cfg.upstream.unix_path == Path("/run/metaproxy/metadata.sock")
    assert (cfg.cache_ttl, cfg.backlog) == (5.0, 64)
    assert cfg.upstream.pipeline == 16


def test_environment_overrides_the_table() -> None:
    cfg = AgentConfig.from_mapping(
        {"shared_secret": "a", "backlog": 10},
        {"METAPROXY_AGENT__BACKLOG": "20", "METAPROXY_AGENT__SHARED_SECRET": "b"},
    )
    assert cfg.backlog == 20
    assert cfg.shared_secret == Secret("b")


def test_neutron_names_work_in_toml_too() -> None:
    cfg = AgentConfig.from_mapping(
        {"metadata_proxy_shared_secret": "a", "nova_metadata_port": 9999}
    )
    assert cfg.upstream.port == 9999


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("http://127.0.0.1:8775", ("http", "127.0.0.1", 8775, None), id="http"),
        pytest.param("https://nova.example", ("https", "nova.example", 443, None), id="https"),
        pytest.param("http://[::1]:81/", ("http", "::1", 81, None), id="ipv6"),
        pytest.param("unix:/run/md.sock", ("unix", None, None, "/run/md.sock"), id="unix"),
        pytest.param(
            "http+unix://%2Frun%2Fmd.sock", ("unix", None, None, "/run/md.sock"), id="http+unix"
        ),
    ],
)
def test_metadata_url_forms(url: str, expected: tuple[Any, ...]) -> None:
    up = AgentConfig.from_mapping({"shared_secret": "a", "metadata_url": url}).upstream
    scheme, host, port, path = expected
    assert up.scheme == scheme
    if path is None:
        assert (up.host, up.port) == (host, port)
    else:
        assert up.unix_path == Path(path)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        pytest.param({"shared_secret": ""}, "agent.shared_secret", id="empty-secret"),
        pytest.param({"socket": "relative.sock"}, "agent.socket", id="relative-socket"),
        pytest.param({"socket": "/" + "x" * 120}, "agent.socket", id="socket-too-long"),
        pytest.param({"socket_mode": "world"}, "agent.socket_mode", id="bad-mode"),
        pytest.param({"backlog": "many"}, "agent.backlog", id="backlog-not-int"),
        pytest.param({"backlog": 0}, "agent.backlog", id="backlog-zero"),
        pytest.param({"workers": 1000}, "agent.workers", id="workers"),
        pytest.param({"cache_ttl": -1}, "agent.cache_ttl", id="ttl-negative"),
        pytest.param({"cache_ttl": "soon"}, "agent.cache_ttl", id="ttl-not-number"),
        pytest.param({"insecure": "maybe"}, "agent.insecure", id="insecure-not-bool"),
        pytest.param({"metadata_url": "ftp://x"}, "agent.metadata_url", id="url-scheme"),
        pytest.param({"metadata_url": "http://x/path"}, "agent.metadata_url", id="url-path"),
        pytest.param({"metadata_url": "http://u:p@x"}, "agent.metadata_url", id="url-creds"),
        pytest.param({"metadata_url": "unix:rel.sock"}, "agent.metadata_url", id="unix-rel"),
        pytest.param(
            {"metadata_url": "http://x", "metadata_port": 1}, "agent.metadata_url", id="url+port"
        ),
        pytest.param({"metadata_protocol": "gopher"}, "agent.metadata_protocol", id="protocol"),
        pytest.param({"metadata_port": 70000}, "agent.metadata_port", id="port-range"),
        pytest.param({"metadata_host": "a b"}, "agent.metadata_host", id="host"),
        pytest.param({"client_cert": "/c.pem"}, "agent.client_key", id="cert-without-key"),
        pytest.param({"client_key": "/c.key"}, "agent.client_cert", id="key-without-cert"),
        pytest.param({"ca_cert": "ca.pem"}, "agent.ca_cert", id="relative-ca"),
        pytest.param({"timeout": 0}, "agent.timeout", id="timeout-zero"),
        pytest.param({"pipeline": 0}, "agent.pipeline", id="pipeline-zero"),
        pytest.param({"pipeline": 1000}, "agent.pipeline", id="pipeline-too-deep"),
        pytest.param({"proxy_user": "no-such-user-xyz"}, "agent.proxy_user", id="unknown-user"),
        pytest.param({"sockett": "/x"}, "agent.sockett", id="unknown-key"),
    ],
)
def test_bad_values_name_their_key(table: dict[str, Any], key: str) -> None:
    merged = {"shared_secret": "s3cr3t-value", **table}
    with pytest.raises(ConfigError) as info:
        AgentConfig.from_mapping(merged)
    assert info.value.key == key
    assert key.split(".")[1] in str(info.value)
    assert "s3cr3t-value" not in str(info.value)


def test_empty_secret_message_is_clear() -> None:
    with pytest.raises(ConfigError, match="refuses to start without the secret"):
        AgentConfig.from_mapping({"shared_secret": ""})
    with pytest.raises(ConfigError, match="refuses to start without the secret") as info:
        AgentConfig.from_mapping({})
    assert info.value.key == "agent.shared_secret"
    with pytest.raises(ConfigError, match="metadata_proxy_shared_secret"):
        AgentConfig.from_neutron_ini("[DEFAULT]\nnova_metadata_port = 8775\n")


def test_secret_file_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shared_secret"):
        AgentConfig.from_mapping({"shared_secret_file": str(tmp_path / "absent")})


def test_secret_never_in_repr() -> None:
    cfg = AgentConfig.from_mapping({"shared_secret": "hunter2-xyz"})
    assert "hunter2-xyz" not in repr(cfg)
    assert "hunter2-xyz" not in str(cfg)


def test_deduce_without_proxy_user_is_user_mode() -> None:
    cfg = AgentConfig.from_mapping({"shared_secret": "a"})
    assert cfg.socket_mode == "deduce"
    assert cfg.socket_mode_bits() == 0o644
    ours = AgentConfig.from_mapping({"shared_secret": "a", "proxy_user": str(os.geteuid())})
    assert ours.socket_mode_bits() == 0o644


def test_broken_ini_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a valid INI"):
        AgentConfig.from_neutron_ini("[DEFAULT]\nthis line has no equals sign\n")


def test_environment_overrides_a_neutron_ini(tmp_path: Path) -> None:
    path = tmp_path / "metadata_agent.ini"
    path.write_text(NEUTRON_INI)
    cfg = load(path, {"METAPROXY_AGENT__METADATA_BACKLOG": "99", "METAPROXY_AGENT__CACHE_TTL": "2"})
    assert (cfg.backlog, cfg.cache_ttl) == (99, 2.0)


def test_unreadable_tls_files_are_a_config_error_naming_them(tmp_path: Path) -> None:
    from metaproxy.agent.upstream import Upstream

    cfg = AgentConfig.from_mapping(
        {
            "shared_secret": "s3cr3t-value",
            "metadata_url": "https://127.0.0.1:8775",
            "ca_cert": str(tmp_path / "missing-ca.pem"),
        }
    )
    with pytest.raises(ConfigError, match=r"missing-ca\.pem") as info:
        Upstream(cfg.upstream, cfg.shared_secret)
    assert "s3cr3t-value" not in str(info.value)


def test_pipeline_flag_keeps_the_url_and_sets_the_depth(tmp_path: Path) -> None:
    import argparse

    from metaproxy.commands import agent as command

    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    parser = argparse.ArgumentParser()
    command.configure(parser)
    flags = ["--shared_secret_file", str(secret), "--metadata_url", "unix:/run/md.sock"]
    args = parser.parse_args([*flags, "--pipeline", "32"])
    cfg, _ = command.config_from_args(args, {})
    assert (cfg.upstream.scheme, cfg.upstream.unix_path) == ("unix", Path("/run/md.sock"))
    assert cfg.upstream.pipeline == 32
    default, _ = command.config_from_args(
        parser.parse_args(["--shared_secret_file", str(secret)]), {}
    )
    assert default.upstream.pipeline == 1
