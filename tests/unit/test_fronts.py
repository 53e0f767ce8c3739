"""Reconcile by diff and namespace tracking, with a fake engine and a fake /run/netns."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaproxy.config import FrontSpec
from metaproxy.errors import NamespaceError
from metaproxy.service import fronts as fronts_mod
from metaproxy.service.fronts import FrontSet, FrontStats
from metaproxy.service.settings import FrontDefaults, FrontEntry, ServiceConfig, front_entry

SERVICE = ServiceConfig(state_path=Path("/var/lib/mp-test"))


class FakeEngine:
    kind = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.running: set[str] = set()
        self.fail: set[str] = set()
        self.closed = False

    async def start(self, spec: FrontSpec) -> None:
        self.calls.append(("start", spec.name))
        if spec.name in self.fail:
            raise NamespaceError(f"cannot enter {spec.netns}", netns=spec.netns)
        if spec.name == "network-buggy":
            raise OSError(98, "Address already in use")
        self.running.add(spec.name)

    async def stop(self, name: str) -> None:
        self.calls.append(("stop", name))
        self.running.discard(name)

    def stats(self, name: str) -> FrontStats:
        return FrontStats(pid=42, requests=7, statuses={"200": 7})

    async def close(self) -> None:
        self.running.clear()
        self.closed = True


def _desired(*entries: FrontEntry) -> list[tuple[FrontEntry, FrontSpec]]:
    return [(e, e.spec(SERVICE, FrontDefaults())) for e in entries]


def _net(ident: str, netns: str = "", **kw: object) -> FrontEntry:
    raw = {"id": ident, "netns": netns, **kw}
    return front_entry("network", raw, where="t", defaults=FrontDefaults())


async def test_reconcile_starts_stops_and_restarts_only_what_changed() -> None:
    engine = FakeEngine()
    fs = FrontSet(engine)
    await fs.reconcile(_desired(_net("a"), _net("b")))
    assert engine.calls == [("start", "network-a"), ("start", "network-b")]
    engine.calls.clear()

    await fs.reconcile(_desired(_net("a"), _net("b")))  # nothing changed: nothing done
    assert engine.calls == []

    await fs.reconcile(_desired(_net("a"), _net("b", port=8080), _net("c")))
    assert engine.calls == [("stop", "network-b"), ("start", "network-b"), ("start", "network-c")]
    engine.calls.clear()

    await fs.reconcile(_desired(_net("c")))
    assert sorted(engine.calls) == [("stop", "network-a"), ("stop", "network-b")]
    assert engine.running == {"network-c"}
    rows = fs.status()
    assert [(r["name"], r["state"], r["pid"], r["requests"]) for r in rows] == [
        ("network-c", "running", 42, 7)
    ]
    await fs.close()
    assert engine.closed and engine.running == set()


async def test_a_failing_front_is_reported_and_retried_without_touching_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FakeEngine()
    engine.fail.add("network-bad")
    fs = FrontSet(engine)
    await fs.reconcile(_desired(_net("good"), _net("bad"), _net("buggy")))
    status = {r["name"]: r for r in fs.status()}
    assert status["network-buggy"]["state"] == "failed"
    assert "Address already in use" in status["network-buggy"]["last_error"]
    await fs.reconcile(_desired(_net("good"), _net("bad")))
    status = {r["name"]: r for r in fs.status()}
    assert status["network-good"]["state"] == "running"
    assert status["network-bad"]["state"] == "failed"
    assert "cannot enter" in status["network-bad"]["last_error"]

    engine.calls.clear()
    await fs.reconcile(_desired(_net("good"), _net("bad")))
    assert engine.calls == []  # within RETRY_AFTER: no hammering

    monkeypatch.setattr(fronts_mod, "RETRY_AFTER", 0.0)
    engine.fail.clear()
    await fs.reconcile(_desired(_net("good"), _net("bad")))
    assert engine.calls == [("start", "network-bad")]
    assert {r["state"] for r in fs.status()} == {"running"}


async def test_deleted_or_replaced_namespace_stops_that_front_only(tmp_path: Path) -> None:
    (tmp_path / "ns-a").write_text("")
    (tmp_path / "ns-b").write_text("")
    engine = FakeEngine()
    fs = FrontSet(engine, netns_root=tmp_path)
    await fs.reconcile(_desired(_net("a", "ns-a"), _net("b", "ns-b"), _net("c", "ns-missing")))
    status = {r["name"]: r["state"] for r in fs.status()}
    assert status == {"network-a": "running", "network-b": "running", "network-c": "netns-gone"}
    assert ("start", "network-c") not in engine.calls

    assert await fs.check_namespaces() == []
    (tmp_path / "ns-a").unlink()
    keep = tmp_path / "keep"
    keep.write_text("")  # hold the old inode so the new file cannot reuse its number
    (tmp_path / "ns-b").rename(keep)
    (tmp_path / "ns-b").write_text("")
    assert sorted(await fs.check_namespaces()) == ["network-a", "network-b"]
    rows = {r["name"]: r for r in fs.status()}
    assert rows["network-a"]["state"] == "netns-gone"
    assert "was deleted" in rows["network-a"]["last_error"]
    assert rows["network-b"]["state"] == "running"  # restarted in the new namespace at once
    assert engine.calls[-2:] == [("stop", "network-b"), ("start", "network-b")]
    assert engine.running == {"network-b"}
