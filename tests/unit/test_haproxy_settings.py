"""The haproxy engine's settings: the [haproxy] table, environment overrides and ns-proxy flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from metaproxy import cli
from metaproxy.config import FrontSpec, Identity
from metaproxy.errors import ConfigError, UntrustedBinary
from metaproxy.haproxy import engine
from metaproxy.security import exec as sexec


def test_defaults() -> None:
    settings = engine.HaproxySettings.from_mapping({})
    assert settings.binary is None
    assert settings.allowed_dirs == sexec.DEFAULT_ALLOWED_DIRS


def test_table_and_environment() -> None:
    settings = engine.HaproxySettings.from_mapping(
        {"binary": "/opt/haproxy/sbin/haproxy", "allowed_dirs": ["/opt/haproxy/sbin"]},
        {"METAPROXY_HAPROXY__STOP_TIMEOUT": "3", "METAPROXY_AGENT__X": "ignored"},
    )
    assert settings.binary == Path("/opt/haproxy/sbin/haproxy")
    assert settings.allowed_dirs == (Path("/opt/haproxy/sbin"),)
    assert settings.stop_timeout == 3.0


@pytest.mark.parametrize(
    ("table", "error"),
    [
        pytest.param({"binray": "/x"}, ConfigError, id="unknown-key"),
        pytest.param({"stop_timeout": "soon"}, ConfigError, id="bad-number"),
        pytest.param({"stop_timeout": 0}, ConfigError, id="zero-timeout"),
        pytest.param({"log": "syslog"}, ConfigError, id="bad-log"),
        pytest.param({"allowed_dirs": "relative/dir"}, UntrustedBinary, id="relative-dir"),
    ],
)
def test_bad_table_is_refused(table: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        engine.HaproxySettings.from_mapping(table)


def test_flags_reach_settings() -> None:
    args = argparse.Namespace(haproxy_binary="/usr/sbin/haproxy", allowed_binary_dirs="/usr/sbin")
    settings = engine.settings_from_args(args, foreground=True)
    assert settings.binary == Path("/usr/sbin/haproxy")
    assert settings.allowed_dirs == (Path("/usr/sbin"),)
    assert settings.log == "stderr"
    assert engine.settings_from_args(argparse.Namespace(), foreground=False).log == "none"


def test_files_live_under_state_path() -> None:
    spec = FrontSpec(Identity("router", "r1"), Path("/s/sock"), "0.0.0.0", 9697, Path("/st"))
    files = engine.files_for(spec)
    assert files.config == Path("/st/haproxy/router-r1.conf")
    assert files.pidfile == Path("/st/router-r1.pid")
    assert files.identity_args == ("-f", "/st/haproxy/router-r1.conf")


def test_help_documents_the_haproxy_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["ns-proxy", "--help"])
    out = capsys.readouterr().out
    for flag in ("--foreground", "--haproxy_binary", "--allowed_binary_dirs", "--destroy"):
        assert flag in out
    assert "--haproxy-binary" in out
