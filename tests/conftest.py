"""Fixtures shared by every test layer."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import netns
from support.recorder import Recorder


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private directory with a short path: Unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def recorder(short_tmp: Path) -> Iterator[Recorder]:
    """A recording HTTP backend on a Unix socket."""
    with Recorder(short_tmp / "agent.sock") as rec:
        yield rec


@pytest.fixture
def ns_pair() -> Iterator[netns.Pair]:
    """A network namespace and an instance namespace joined by a veth (root only)."""
    if netns.requires_netns.args[0]:
        pytest.skip(netns.requires_netns.kwargs["reason"])
    with netns.netns_pair() as pair:
        yield pair
