"""The systemd units in contrib/: `systemd-analyze verify` accepts each, and what they run works.

The units name /opt/metaproxy/.venv/bin/metaproxy; the copies checked here name this test
run's own `metaproxy`, since verify also checks that ExecStart's program exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
INSTALLED = "/opt/metaproxy/.venv/bin/metaproxy"
METAPROXY = str(Path(sys.executable).with_name("metaproxy"))
UNITS = sorted(p.name for p in CONTRIB.glob("*.service"))

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (scripts/setup.sh installs systemd; CI has it)",
)


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit.parent,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


def _copy(name: str, tmp_path: Path) -> Path:
    text = (CONTRIB / name).read_text()
    assert INSTALLED in text, f"{name} no longer names {INSTALLED}: update this test"
    # A template is verified as one of its instances.
    target = tmp_path / name.replace("@.service", "@net-1.service")
    target.write_text(text.replace(INSTALLED, METAPROXY))
    return target


def test_every_unit_is_checked() -> None:
    assert UNITS == [
        "metaproxy-agent.service",
        "metaproxy-ns-proxy@.service",
        "metaproxy.service",
    ]


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    unit = _copy(name, tmp_path)
    done = _verify(unit)
    assert done.returncode == 0, done.stderr
    complaints = [line for line in done.stderr.splitlines() if unit.name in line]
    assert complaints == []


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive is reported against the file."""
    unit = _copy("metaproxy.service", tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSytem="))
    done = _verify(unit)
    assert any(unit.name in line and "ProtectSytem" in line for line in done.stderr.splitlines())


def test_the_services_config_check_passes_on_the_example(tmp_path: Path) -> None:
    """metaproxy.service's ExecStartPre, with METAPROXY_CONFIG as the unit sets it."""
    unit = (CONTRIB / "metaproxy.service").read_text()
    assert f"ExecStartPre={INSTALLED} check-config" in unit
    assert "Environment=METAPROXY_CONFIG=" in unit
    config = tmp_path / "metaproxy.toml"
    text = (CONTRIB / "metaproxy.toml.example").read_text()
    config.write_text(text.replace("/var/lib/metaproxy", str(tmp_path / "state")))
    done = subprocess.run(
        [METAPROXY, "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "METAPROXY_CONFIG": str(config)},
    )
    assert done.returncode == 0, done.stderr
    assert str(config) in done.stdout
