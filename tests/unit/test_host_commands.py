"""The text the operator reads: status table, check-config, and their failure messages."""

from __future__ import annotations

import json
from pathlib import Path

from metaproxy.commands import checkconfig, status
from support import cli

STATUS = {
    "service": {
        "version": "0.1.0",
        "pid": 10,
        "uptime": 3.0,
        "engine": "builtin",
        "state_path": "/var/lib/metaproxy",
        "metrics": "off",
    },
    "fronts": [
        {
            "name": "network-a",
            "netns": "qdhcp-a",
            "engine": "builtin",
            "pid": 10,
            "state": "running",
            "requests": 12,
            "errors": 0,
            "last_error": "",
        },
        {
            "name": "router-long-name",
            "netns": "qrouter-r",
            "engine": "builtin",
            "pid": None,
            "state": "netns-gone",
            "requests": 0,
            "errors": 0,
            "last_error": "namespace qrouter-r was deleted",
        },
    ],
    "agent": {
        "state": "running",
        "socket": "/s",
        "upstream": "unix:/m",
        "lookups": 3,
        "cache_hits": 9,
        "responses": {"200": 12},
    },
    "server": {"state": "running", "listen": "unix:/m"},
}


def test_status_table_lines_up() -> None:
    lines = status.render(STATUS).splitlines()
    assert lines[0].startswith("metaproxy 0.1.0  pid 10")
    header, first, second = lines[2:5]
    assert header.split() == [
        "FRONT",
        "NAMESPACE",
        "ENGINE",
        "PID",
        "STATE",
        "REQUESTS",
        "ERRORS",
        "LAST",
        "ERROR",
    ]
    assert header.index("STATE") == first.index("running") == second.index("netns-gone")
    assert second.endswith("namespace qrouter-r was deleted")
    assert " - " in second  # no pid
    assert "lookups 3  cache hits 9" in lines[6]


def test_status_without_a_running_service_is_a_clear_error(short_tmp: Path) -> None:
    result = cli.run("status", "--state-path", str(short_tmp))
    assert result.returncode == 1
    assert "metaproxy is not running" in result.stderr
    assert str(short_tmp / "control.sock") in result.stderr


def test_check_config_prints_effective_values_masked(short_tmp: Path) -> None:
    config = short_tmp / "m.toml"
    config.write_text(
        f'[service]\nstate_path = "{short_tmp}"\nshared_secret = "s3cr3t-value"\n'
        '[agent]\nmetadata_proxy_shared_secret = "other-s3cr3t"\n'
        '[[network]]\nid = "n1"\n'
    )
    text = cli.run("check-config", "--config", str(config))
    assert text.returncode == 0, text.stderr
    assert "s3cr3t" not in text.stdout + text.stderr
    assert '[[fronts]]\nname = "network-n1"\nnetns = "qdhcp-n1"' in text.stdout
    data = json.loads(cli.run("check-config", "--json", "--config", str(config)).stdout)
    masked = "***"
    assert data["service"]["shared_secret"] == masked
    assert data["agent"]["metadata_proxy_shared_secret"] == masked
    bad = cli.run(
        "check-config", "--config", str(config), env=cli.env(METAPROXY_SERVICE__ENGINE="nginx")
    )
    assert bad.returncode == 2
    assert "service.engine: 'nginx' is not one of builtin, haproxy" in bad.stderr


def test_render_is_toml_like() -> None:
    text = checkconfig.render({"source": "x", "service": {"a": 1}, "fronts": []})
    assert text.splitlines() == [
        "# source: x",
        "",
        "[service]",
        "a = 1",
        "",
        "# no fronts declared in the file (the store may add some)",
    ]
