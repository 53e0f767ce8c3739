"""Fixtures for the attack suite, and the summary table printed at the end of every run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attack import fronts, tally
from attack.backend import RawBackend


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.attack)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not tally.ROWS:
        return
    table = tally.markdown()
    terminalreporter.write_sep("=", "attack summary (tests/attack)")
    terminalreporter.write_line(table)
    for line in tally.NOTES:
        terminalreporter.write_line(f"  {line}")
    for line in tally.failures():
        terminalreporter.write_line(f"GOT THROUGH / NOT SURVIVED: {line}")
    out = os.environ.get("METAPROXY_ATTACK_TABLE")
    if out:
        Path(out).write_text(table + "\n")


@pytest.fixture(scope="module")
def attack_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A short private directory per module (Unix socket paths must fit in 108 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="mp-atk-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def raw_backend(attack_tmp: Path) -> Iterator[RawBackend]:
    with RawBackend(attack_tmp / "agent.sock") as backend:
        yield backend


@pytest.fixture(scope="module", params=fronts.engine_params())
def front(
    request: pytest.FixtureRequest, raw_backend: RawBackend, attack_tmp: Path
) -> Iterator[fronts.Front]:
    """A real front of each engine on 127.0.0.1, relaying to the module's raw backend."""
    engine: str = request.param
    with fronts.running_front(
        engine,
        raw_backend.path,
        attack_tmp / engine,
        timeouts={"http_request": 2, "http_keep_alive": 2, "client": 5, "server": 5, "connect": 2},
    ) as running:
        yield running
