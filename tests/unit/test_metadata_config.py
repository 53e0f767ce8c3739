"""The [metadata] and [store] slices: listen addresses, secrets, token modes, store path."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaproxy.config import Secret
from metaproxy.errors import ConfigError
from metaproxy.metadata.config import Listen, MetadataConfig, StoreConfig


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1:8775", Listen("127.0.0.1", 8775), id="v4"),
        pytest.param("[::1]:80", Listen("::1", 80), id="v6"),
        pytest.param("unix:/run/m.sock", Listen(unix=Path("/run/m.sock")), id="unix"),
    ],
)
def test_listen_parses(text: str, expected: Listen) -> None:
    assert Listen.parse(text) == expected
    assert str(Listen.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    ["localhost:80", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "unix:rel.sock", ""],
)
def test_listen_refuses(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Listen.parse(text)
    assert info.value.key == "metadata.listen"


def test_metadata_config_sources(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("from-file\n")
    cfg = MetadataConfig.from_mapping({"shared_secret_file": str(tmp_path / "s")})
    assert cfg.shared_secret == Secret("from-file") and cfg.tokens == "optional"
    env = {"METAPROXY_METADATA__TOKENS": "required", "METAPROXY_METADATA__SHARED_SECRET": "e"}
    cfg = MetadataConfig.from_mapping({"tokens": "off"}, env)
    assert cfg.tokens == "required" and cfg.shared_secret == Secret("e")
    cfg = MetadataConfig.from_mapping({}, secret=Secret("svc"), listen="unix:/x/m.sock")
    assert cfg.shared_secret == Secret("svc") and cfg.listen.unix == Path("/x/m.sock")
    assert "svc" not in repr(cfg)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        pytest.param({}, "metadata.shared_secret", id="no-secret"),
        pytest.param({"shared_secret": "x", "tokens": "maybe"}, "metadata.tokens", id="mode"),
        pytest.param({"shared_secret": "x", "listn": "a"}, "metadata.listn", id="unknown"),
    ],
)
def test_metadata_config_refuses(table: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        MetadataConfig.from_mapping(table)
    assert info.value.key == key


def test_store_config() -> None:
    assert StoreConfig.from_mapping({}).path == Path("/var/lib/metaproxy/metaproxy.db")
    assert StoreConfig.from_mapping({}, state_path=Path("/s")).path == Path("/s/metaproxy.db")
    env = {"METAPROXY_STORE__PATH": "/e/x.db"}
    assert StoreConfig.from_mapping({"path": "/t/x.db"}, env).path == Path("/e/x.db")
    with pytest.raises(ConfigError, match="not supported"):
        StoreConfig.from_mapping({"backend": "postgres"})
