"""`--workers`: the steering rule, the maxconn split, and the flag's usage errors."""

from __future__ import annotations

import socket

import pytest

from metaproxy import cli
from metaproxy.errors import ConfigError
from metaproxy.front import steering
from metaproxy.front.workers import split_maxconn


@pytest.mark.parametrize(
    ("address", "port", "workers", "expected"),
    [
        pytest.param("169.254.10.2", 40000, 2, 0, id="v4-even"),
        pytest.param("169.254.10.3", 40000, 2, 1, id="v4-odd"),
        pytest.param("169.254.10.3", 40001, 2, 1, id="v4-port-ignored"),
        pytest.param("10.0.0.7", 1, 4, 3, id="v4-mod-4"),
        pytest.param("127.0.0.1", 40001, 2, 1, id="loopback-by-port"),
        pytest.param("127.0.0.1", 40003, 2, 0, id="loopback-other-port"),
        pytest.param("127.9.9.9", 40003, 2, 0, id="loopback-net-by-port"),
        pytest.param("::1", 40003, 2, 0, id="v6-loopback-by-port"),
        pytest.param("fe80::1:0:3", 40000, 3, 0, id="v6-low-32-bits"),
        pytest.param("fe80::2%eth0", 40000, 3, 2, id="v6-scoped"),
        pytest.param("169.254.0.9", 5, 1, 0, id="one-worker"),
    ],
)
def test_pick_mirrors_the_program(address: str, port: int, workers: int, expected: int) -> None:
    assert steering.pick(address, port, workers) == expected


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_loopback_ports_of_one_parity_still_spread(workers: int) -> None:
    """connect(2) hands out ephemeral ports of one parity first: `port mod 2` would not do."""
    counts = [0] * workers
    for port in range(32769, 60999, 2):
        counts[steering.pick("127.0.0.1", port, workers)] += 1
    assert min(counts) > 0.8 * max(counts), counts


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_program_returns_through_a_modulo_only(family: socket.AddressFamily) -> None:
    """Every return is `A mod N` (never an index out of range, which means 'kernel hash')."""
    program = steering.program(family, 5)
    returns = [i for i, ins in enumerate(program) if ins[0] == 0x16]
    assert returns and all(program[i - 1] == (0x94, 0, 0, 5) for i in returns)
    assert program[-1][0] == 0x16
    for i, (code, jt, jf, _) in enumerate(program):
        if code & 0x07 == 0x05:  # BPF_JMP: both targets inside the program
            assert i + 1 + max(jt, jf) < len(program)


@pytest.mark.parametrize("workers", [0, 65])
def test_program_refuses_a_bad_count(workers: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 64"):
        steering.program(socket.AF_INET, workers)


@pytest.mark.parametrize(
    ("maxconn", "workers", "shares"),
    [
        pytest.param(1024, 2, [512, 512], id="even"),
        pytest.param(1024, 3, [342, 341, 341], id="remainder"),
        pytest.param(5, 5, [1] * 5, id="one-each"),
        pytest.param(7, 1, [7], id="single"),
    ],
)
def test_maxconn_split_never_exceeds_the_total(
    maxconn: int, workers: int, shares: list[int]
) -> None:
    assert split_maxconn(maxconn, workers) == shares
    assert sum(shares) == maxconn and max(shares) == -(-maxconn // workers)


def test_more_workers_than_maxconn_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot share maxconn 2"):
        split_maxconn(2, 3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(["--workers", "0"], "--workers must be between 1 and 64, not 0", id="zero"),
        pytest.param(["--workers", "65"], "--workers must be between 1 and 64, not 65", id="65"),
        pytest.param(
            ["--workers", "2", "--engine", "haproxy"],
            "--workers is for the builtin engine",
            id="haproxy",
        ),
        pytest.param(["--pipeline", "0"], "--pipeline must be between 1 and 64, not 0", id="p0"),
        pytest.param(["--pipeline", "65"], "--pipeline must be between 1 and 64, not 65", id="p65"),
        pytest.param(
            ["--pipeline", "4", "--engine", "haproxy"],
            "--pipeline is for the builtin engine",
            id="pipeline-haproxy",
        ),
    ],
)
def test_bad_workers_flag_is_a_usage_error(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ns-proxy", "--network_id", "n1", *extra]) == 2
    assert message in capsys.readouterr().err


def test_help_explains_the_workers_trade_off(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["ns-proxy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--workers N" in text
    assert "ceil(maxconn/N)" in text
    assert "same worker" in text
    assert "--pipeline N" in text
    assert "never relayed to the wrong instance" in text
