"""settle_gc: what start-up made is frozen out of collections, and collections run less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from metaproxy import runtime


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restore_gc")
def test_settle_gc_freezes_and_raises_the_threshold() -> None:
    gc.unfreeze()
    runtime.settle_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == runtime.GC_THRESHOLD
    assert gc.isenabled()  # garbage is still collected
