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


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["agent", "--metadata_proxy_shared_secret", "hunter2"], id="neutron-name"),
        pytest.param(["agent", "--metadata-proxy-shared-secret=hunter2"], id="dashed-equals"),
        pytest.param(["up", "--shared_secret", "hunter2"], id="other-command"),
    ],
)
def test_a_secret_on_the_command_line_is_refused_without_echoing_it(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.err + captured.out
    assert "never taken on the command line" in captured.err


def test_a_secret_file_option_is_not_mistaken_for_a_secret() -> None:
    assert cli._secret_flag(["agent", "--shared_secret_file", "/etc/secret"]) is None
    assert cli._secret_flag(["agent", "--shared-secret-file=/etc/secret"]) is None
