"""The command line's usage errors and help."""

from __future__ import annotations

import pytest

from metaproxy import cli


def test_help_lists_ns_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "ns-proxy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["ns-proxy"], id="neither"),
        pytest.param(["ns-proxy", "--network_id", "n1", "--router_id", "r1"], id="both"),
        pytest.param(["ns-proxy", "--network-id", "n1", "--router-id", "r1"], id="both-dashed"),
    ],
)
def test_ns_proxy_identity_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert "exactly one of --network_id and --router_id" in capsys.readouterr().err


def test_unknown_user_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ns-proxy", "--network_id", "n1", "--metadata_proxy_user", "no-such-user-xyz"]
    assert cli.main(argv) == 2
    assert "unknown user 'no-such-user-xyz'" in capsys.readouterr().err
