"""Shared config values: IDs, secrets, users and the FrontSpec checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaproxy.config import (
    FrontSpec,
    Identity,
    Secret,
    Timeouts,
    parse_address,
    resolve_group,
    resolve_user,
    validate_id,
)
from metaproxy.errors import ConfigError


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("net\nbind *:1", id="newline-injection"),
        pytest.param("", id="empty"),
        pytest.param("a b", id="space"),
        pytest.param("-leading-dash", id="leading-dash"),
        pytest.param("x" * 65, id="too-long"),
        pytest.param("id;rm", id="semicolon"),
        pytest.param("ünï", id="non-ascii"),
    ],
)
def test_bad_ids_are_refused(value: str) -> None:
    with pytest.raises(ConfigError):
        validate_id(value, key="network_id")


@pytest.mark.parametrize("value", ["6e6b1a54-3a3f-4d8d-8a39-4b0c0b3e2f11", "net1", "a.b_c-d"])
def test_good_ids_pass(value: str) -> None:
    assert validate_id(value, key="network_id") == value


def test_secret_never_shows_itself() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret}"
    assert secret.reveal() == "hunter2"
    assert not Secret("")


@pytest.mark.parametrize(
    ("value", "expected"), [("root", 0), ("0", 0), (0, 0), (None, None), ("", None)]
)
def test_resolve_user(value: str | int | None, expected: int | None) -> None:
    assert resolve_user(value) == expected


def test_unknown_user_and_group_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="unknown user 'no-such-user-xyz'"):
        resolve_user("no-such-user-xyz", key="metadata_proxy_user")
    with pytest.raises(ConfigError, match="unknown group 'no-such-group-xyz'"):
        resolve_group("no-such-group-xyz", key="metadata_proxy_group")


def _spec(**kw: object) -> FrontSpec:
    base: dict[str, object] = {
        "identity": Identity("network", "net1"),
        "upstream_socket": Path("/run/mp.sock"),
        "bind_address": "169.254.169.254",
        "port": 80,
        "state_path": Path("/var/lib/metaproxy"),
    }
    base.update(kw)
    return FrontSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        pytest.param({"bind_address": "not-an-ip"}, "bind_address", id="bad-address"),
        pytest.param({"port": 0}, "metadata_port", id="port-zero"),
        pytest.param({"port": 70000}, "metadata_port", id="port-too-big"),
        pytest.param({"upstream_socket": Path("rel.sock")}, "upstream_socket", id="relative"),
        pytest.param({"netns": "../etc"}, "netns", id="netns-traversal"),
        pytest.param({"bind_address": "fe80::a9fe:a9fe"}, "interface", id="v6-ll-no-iface"),
    ],
)
def test_front_spec_refuses(kw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _spec(**kw)
    assert info.value.key == key


def test_front_spec_name_and_header() -> None:
    spec = _spec(identity=Identity("router", "r1"))
    assert spec.name == "router-r1"
    assert spec.identity.header == "X-Neutron-Router-ID"


def test_timeouts_default_to_neutrons() -> None:
    t = Timeouts()
    assert (t.http_request, t.connect, t.client, t.server, t.http_keep_alive) == (
        30,
        30,
        32,
        32,
        30,
    )
    with pytest.raises(ConfigError):
        Timeouts(client=0)


@pytest.mark.parametrize(
    ("text", "zero", "expected"),
    [
        pytest.param("unix:/run/mp.sock", False, (Path("/run/mp.sock"), None, None), id="unix"),
        pytest.param("127.0.0.1:8775", False, (None, "127.0.0.1", 8775), id="v4"),
        pytest.param("[::1]:9100", False, (None, "::1", 9100), id="v6"),
        pytest.param("127.0.0.1:0", True, (None, "127.0.0.1", 0), id="port-zero-allowed"),
    ],
)
def test_parse_address(text: str, zero: bool, expected: tuple[object, ...]) -> None:
    assert parse_address(text, key="k", allow_port_zero=zero) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("unix:relative.sock", id="relative-unix"),
        pytest.param("localhost:80", id="name-not-address"),
        pytest.param("127.0.0.1", id="no-port"),
        pytest.param("127.0.0.1:0", id="port-zero"),
        pytest.param("127.0.0.1:65536", id="port-too-big"),
        pytest.param("[::1:80", id="half-bracket"),
    ],
)
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text, key="metadata.listen")
    assert info.value.key == "metadata.listen"
