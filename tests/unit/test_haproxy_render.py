"""haproxy/render.py: configs compared with golden files in tests/data/, and checked by haproxy.

Regenerate after an intended change:
`METAPROXY_UPDATE_GOLDEN=1 pytest tests/unit/test_haproxy_render.py`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from metaproxy.config import FrontSpec, Identity, Timeouts
from metaproxy.errors import ConfigError, UntrustedBinary
from metaproxy.front.ratelimit import RateLimitConfig, SourceLimits
from metaproxy.haproxy import engine
from metaproxy.haproxy.render import RenderSettings, render_config
from metaproxy.security import exec as sexec
from support import netns

DATA = Path(__file__).resolve().parent.parent / "data"
SOCK = Path("/var/lib/metaproxy/metadata_proxy")
STATE = Path("/var/lib/metaproxy")
STATS = Path("/var/lib/metaproxy/haproxy/front.sock")

CASES = {
    "network-default": (
        FrontSpec(Identity("network", "net-1"), SOCK, "169.254.169.254", 80, STATE),
        RenderSettings(),
    ),
    "router-user-netns": (
        FrontSpec(
            Identity("router", "rtr-1"),
            SOCK,
            "0.0.0.0",
            9697,
            STATE,
            netns="mp-golden-rtr",
            user=65534,
            group=65534,
        ),
        RenderSettings(log="none", stats_socket=STATS),
    ),
    "network-ipv6-timeouts": (
        FrontSpec(
            Identity("network", "net-6"),
            SOCK,
            "fe80::a9fe:a9fe",
            80,
            STATE,
            netns="mp-golden-net6",
            interface="tap0",
            timeouts=Timeouts(http_request=5, connect=2.5, client=10, server=10, http_keep_alive=1),
            max_body=1024,
        ),
        RenderSettings(stats_socket=STATS),
    ),
    "network-rate-limited": (
        FrontSpec(Identity("network", "net-r"), SOCK, "169.254.169.254", 80, STATE),
        RenderSettings(
            log="none",
            limits=SourceLimits(
                max_conn_per_source=8,
                rate_limit=RateLimitConfig(
                    rate_limit_enabled=True,
                    base_window_duration=60,
                    base_query_rate_limit=40,
                    burst_window_duration=2.5,
                    burst_query_rate_limit=12,
                ),
            ),
        ),
    ),
}


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in CASES])
def test_render_matches_golden(name: str) -> None:
    spec, settings = CASES[name]
    text = render_config(spec, settings)
    golden = DATA / f"haproxy-{name}.cfg"
    if os.environ.get("METAPROXY_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.haproxy
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in CASES])
def test_golden_configs_pass_haproxy_check(name: str, short_tmp: Path) -> None:
    """Every rendered config is one haproxy accepts (`-c` opens the namespace, so make one)."""
    try:
        binary = engine.find_binary(engine.HaproxySettings())
    except UntrustedBinary as exc:
        pytest.skip(f"no trusted haproxy installed (CI installs it): {exc}")
    spec, _ = CASES[name]
    text = (DATA / f"haproxy-{name}.cfg").read_text()
    config = short_tmp / "check.cfg"
    with contextlib.ExitStack() as stack:
        if spec.netns:
            if os.geteuid() != 0:
                pytest.skip("needs root to create the namespace haproxy -c opens")
            ns = f"mp-chk-{netns.suffix()}"
            netns.ip("netns", "add", ns)
            stack.callback(netns.ip, "netns", "del", ns, check=False)
            text = text.replace(f"namespace {spec.netns}", f"namespace {ns}")
        config.write_text(text)
        out = sexec.run([str(binary), "-c", "-f", str(config)], timeout=60)
    assert "Configuration file is valid" in out


def test_rendered_rules_refuse_before_they_rewrite() -> None:
    """Deny rules run before headers are deleted and ours set (haproxy runs them in order)."""
    spec, settings = CASES["network-default"]
    lines = [ln.strip() for ln in render_config(spec, settings).splitlines()]
    rules = [ln for ln in lines if ln.startswith("http-request")]
    phase = {"deny": 0, "set-var": 0, "return": 0, "del-header": 1, "set-header": 2}
    phases = [phase[r.split()[1].split("(")[0]] for r in rules]
    assert phases == sorted(phases)
    assert rules[-1] == "http-request set-header X-Forwarded-For %[src]"


@pytest.mark.parametrize(
    "socket_path",
    [
        pytest.param("/var/lib/meta proxy/sock", id="space"),
        pytest.param("/var/lib/x#y", id="comment"),
        pytest.param("/var/lib/x\ny", id="newline"),
    ],
)
def test_paths_that_would_inject_config_are_refused(socket_path: str) -> None:
    spec = FrontSpec(Identity("network", "n"), Path(socket_path), "127.0.0.1", 80, STATE)
    with pytest.raises(ConfigError):
        render_config(spec)


@pytest.mark.parametrize(
    ("bind", "versions", "limited"),
    [
        ("169.254.169.254", (4,), True),
        ("169.254.169.254", (6,), False),
        ("fe80::a9fe:a9fe", (4,), False),
        ("fe80::a9fe:a9fe", (6,), True),
        ("fe80::a9fe:a9fe", (4, 6), True),
    ],
)
def test_rate_limit_follows_the_fronts_address_family(
    bind: str, versions: tuple[int, ...], limited: bool
) -> None:
    """Neutron's ip_versions: a front serves one family, so its config has the rules or not."""
    spec = FrontSpec(Identity("network", "net-1"), SOCK, bind, 80, STATE, interface="tap0")
    rate = RateLimitConfig(rate_limit_enabled=True, ip_versions=versions)
    text = render_config(spec, RenderSettings(limits=SourceLimits(rate_limit=rate)))
    assert ("deny_status 429" in text) is limited
    assert ("backend rate_base" in text) is limited


def test_rate_limit_off_renders_no_tables() -> None:
    spec, _ = CASES["network-default"]
    text = render_config(spec, RenderSettings())
    assert "http_req_rate" not in text
    assert "sc0_conn_cur gt 64" in text
