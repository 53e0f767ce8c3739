"""The SQLite store: lookups the agent relies on, all-or-nothing writes, concurrent processes."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from metaproxy.errors import StoreError
from metaproxy.metadata import model
from metaproxy.metadata.records import PortMatch
from metaproxy.metadata.schema import SCHEMA_VERSION
from metaproxy.metadata.store import SqliteStore

UUID1 = "11111111-1111-4111-8111-111111111111"
UUID2 = "22222222-2222-4222-8222-222222222222"

INVENTORY: dict[str, Any] = {
    "networks": [{"id": "net1"}, {"id": "net2"}, {"id": "net3"}],
    "routers": [{"id": "r1", "networks": ["net1", "net2"]}],
    "instances": [
        {"uuid": UUID1, "project_id": "p1", "name": "vm1"},
        {"uuid": UUID2, "project_id": "p2", "name": "vm2"},
    ],
    "ports": [
        {
            "id": "port1",
            "network_id": "net1",
            "mac": "fa:16:3e:00:00:01",
            "instance_id": UUID1,
            "fixed_ips": ["169.254.10.5", "fe80::f816:3eff:fe00:1"],
        },
        # Same IP on another network: overlapping tenant ranges are normal.
        {
            "id": "port2",
            "network_id": "net2",
            "mac": "fa:16:3e:00:00:02",
            "instance_id": UUID2,
            "fixed_ips": ["169.254.10.5"],
        },
    ],
}


@pytest.fixture
def store(short_tmp: Path) -> SqliteStore:
    s = SqliteStore(short_tmp / "state" / "metaproxy.db")
    s.import_inventory(model.inventory_from_mapping(INVENTORY))
    return s


def _counts(path: Path) -> tuple[int, ...]:
    with sqlite3.connect(path) as db:
        return tuple(
            db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608
            for t in ("networks", "routers", "router_networks", "instances", "ports", "fixed_ips")
        )


def test_lookup_by_ip_and_mac(store: SqliteStore) -> None:
    m1 = PortMatch("port1", "net1", UUID1, "p1")
    m2 = PortMatch("port2", "net2", UUID2, "p2")
    assert store.ports_by_ip(["net1"], "169.254.10.5") == [m1]
    assert sorted(store.ports_by_ip(["net1", "net2"], "169.254.10.5"), key=str) == [m1, m2]
    assert store.ports_by_ip(["net3"], "169.254.10.5") == []
    assert store.ports_by_ip([], "169.254.10.5") == []
    assert store.ports_by_ip(["net1"], "fe80::f816:3eff:fe00:1") == [m1]
    assert store.ports_by_mac(["net1", "net2"], "fa:16:3e:00:00:02") == [m2]
    assert store.ports_by_mac(["net1"], "fa:16:3e:00:00:02") == []
    assert store.router_networks("r1") == ["net1", "net2"]
    assert store.router_networks("nope") == []


def test_lookups_use_indexes(store: SqliteStore) -> None:
    db = sqlite3.connect(store.path)
    plan = " ".join(
        str(r)
        for r in db.execute(
            "EXPLAIN QUERY PLAN SELECT p.id FROM fixed_ips f JOIN ports p ON p.id = f.port_id "
            "WHERE f.network_id IN (?, ?) AND f.ip = ?",
            ("a", "b", "c"),
        )
    )
    assert "SCAN" not in plan, plan
    plan = " ".join(
        str(r)
        for r in db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM ports WHERE network_id IN (?) AND mac = ?",
            ("a", "b"),
        )
    )
    assert "SCAN" not in plan, plan


def test_file_is_private_and_versioned(store: SqliteStore) -> None:
    store.networks()
    for suffix in ("", "-wal", "-shm"):  # SQLite gives its side files the database's mode
        assert stat.S_IMODE(Path(f"{store.path}{suffix}").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(short_tmp: Path) -> None:
    path = short_tmp / "m.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this metaproxy knows"):
        SqliteStore(path)


def test_symlinked_store_is_refused(short_tmp: Path) -> None:
    target = short_tmp / "elsewhere"
    target.write_text("")
    (short_tmp / "m.db").symlink_to(target)
    with pytest.raises(StoreError, match="cannot open store"):
        SqliteStore(short_tmp / "m.db")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"networks": [{"id": "net1"}]}, "networks[1].id", id="duplicate-network"),
        pytest.param(
            {"ports": [{**INVENTORY["ports"][0], "id": "p9", "mac": "fa:16:3e:00:00:09"}]},
            "ports[0].fixed_ips[0]",
            id="duplicate-ip-on-network",
        ),
        pytest.param(
            {"ports": [{**INVENTORY["ports"][0], "id": "p9", "fixed_ips": []}]},
            "ports[0].mac",
            id="duplicate-mac-on-network",
        ),
        pytest.param(
            {"ports": [{**INVENTORY["ports"][0], "id": "p9", "network_id": "nope"}]},
            "ports[0].network_id",
            id="unknown-network",
        ),
        pytest.param(
            {"ports": [{**INVENTORY["ports"][0], "id": "p9", "instance_id": str(uuid.uuid4())}]},
            "ports[0].instance_id",
            id="unknown-instance",
        ),
        pytest.param(
            {
                "ports": [
                    {**INVENTORY["ports"][1], "id": "p9", "network_id": "net3", "project_id": "p1"}
                ]
            },
            "ports[0].project_id",
            id="foreign-project",
        ),
        pytest.param(
            {"routers": [{"id": "r2", "networks": ["nope"]}]},
            "routers[0].networks[0]",
            id="router-net",
        ),
    ],
)
def test_failed_import_writes_nothing(
    store: SqliteStore, change: dict[str, Any], field: str
) -> None:
    # Each document also carries valid new records *before* the bad one: none may survive.
    doc = {
        "networks": [{"id": "fresh-net"}, *change.get("networks", [])],
        "instances": [{"uuid": str(uuid.uuid4()), "project_id": "p3", "name": "fresh"}],
        "routers": change.get("routers", []),
        "ports": change.get("ports", []),
    }
    before = _counts(store.path)
    with pytest.raises(StoreError) as info:
        store.import_inventory(model.inventory_from_mapping(doc))
    assert info.value.field == field
    assert _counts(store.path) == before
    if field != "networks[1].id":  # the one document that is valid once the store is emptied
        with pytest.raises(StoreError):
            store.import_inventory(model.inventory_from_mapping(doc), replace=True)
        assert _counts(store.path) == before


def test_replace_import_and_export_round_trip(store: SqliteStore) -> None:
    exported = store.export_inventory()
    store.import_inventory(exported, replace=True)
    assert store.export_inventory() == exported
    assert len(exported.ports) == 2 and exported.ports[0].project_id == "p1"


def test_removals_refuse_what_is_in_use(store: SqliteStore) -> None:
    with pytest.raises(StoreError, match="still has ports"):
        store.remove_network("net1")
    with pytest.raises(StoreError, match="already attached"):
        store.attach("r1", "net1")
    with pytest.raises(StoreError, match="still has ports"):
        store.remove_instance(UUID1)
    store.remove_instance(UUID1, with_ports=True)
    assert store.ports_by_ip(["net1"], "169.254.10.5") == []
    with pytest.raises(StoreError, match="attached to router"):
        store.remove_network("net1")
    store.detach("r1", "net1")
    store.remove_network("net1")
    with pytest.raises(StoreError) as info:
        store.remove_port("port1")
    assert info.value.field == "port_id"


def test_transaction_groups_writes(store: SqliteStore) -> None:
    with pytest.raises(StoreError), store.transaction():
        store.remove_port("port2")
        store.remove_port("port1")
        store.remove_port("nope")  # fails: the two removals above must be undone
    assert {p.id for p in store.ports()} == {"port1", "port2"}


def test_password_is_set_once(store: SqliteStore) -> None:
    assert store.set_password(UUID1, "secret-1")
    assert not store.set_password(UUID1, "secret-2")
    view = store.instance_view(UUID1)
    assert view is not None and view.instance.password == "secret-1"  # noqa: S105


def test_instance_view_has_ports_and_networks(store: SqliteStore) -> None:
    view = store.instance_view(UUID1)
    assert view is not None
    [(port, network)] = view.ports
    assert port.fixed_ips == ("169.254.10.5", "fe80::f816:3eff:fe00:1") and network.id == "net1"
    assert store.instance_view(str(uuid.uuid4())) is None


def test_data_version_moves_on_any_commit(store: SqliteStore) -> None:
    first = store.data_version()
    assert store.data_version() == first
    other = SqliteStore(store.path)
    other.add_network(model.Network("net9"))
    other.close()
    second = store.data_version()
    assert second != first
    store.add_network(model.Network("net10"))
    assert store.data_version() != second


# -- two processes at once ------------------------------------------------------------------------

ROUNDS = 150


def _writer(path: str, start: Any, seen: Any, done: Any) -> None:
    """Adds instances (one transaction each: the instance and its 3 ports), removes half."""
    s = SqliteStore(path)
    start.wait(30)  # a barrier: both processes have opened the store before either goes
    for n in range(ROUNDS):
        uid = str(uuid.UUID(int=n + 1000))
        s.import_inventory(
            model.inventory_from_mapping(
                {
                    "instances": [{"uuid": uid, "project_id": "pw", "name": f"w{n}"}],
                    "ports": [
                        {
                            "id": f"wport{n}-{i}",
                            "network_id": "net3",
                            "mac": f"fa:16:3e:10:{n:02x}:{i:02x}",
                            "instance_id": uid,
                            "fixed_ips": [f"169.254.{n}.{i + 1}"],
                        }
                        for i in range(3)
                    ],
                }
            )
        )
        if n % 2:
            s.remove_instance(uid, with_ports=True)
        if n == 0:
            # Under load the reader may not get a turn before all rounds are written: let it
            # see the first instance, so the rest is written while it reads.
            seen.wait(30)
    done.set()
    s.close()


def _reader(path: str, start: Any, seen: Any, done: Any, results: Any) -> None:
    """Reads whole instances (and writes too: networks) until the writer is done."""
    s = SqliteStore(path)
    reads = overlapping = 0
    try:
        start.wait(30)  # a barrier: both processes have opened the store before either goes
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            for inst in s.instances():
                view = s.instance_view(inst.uuid)
                # A view is all or nothing: writer instances always have exactly 3 ports.
                if view is not None and inst.project_id == "pw":
                    overlapping += 1
                    seen.set()
                    if len(view.ports) != 3:
                        results.put(f"half an instance: {inst.uuid}, {len(view.ports)} ports")
                reads += 1
            s.ports_by_ip(["net3"], "169.254.0.1")
            s.add_network(model.Network(f"rnet{reads}"))
            s.remove_network(f"rnet{reads}")
    except Exception as exc:
        results.put(repr(exc))
    results.put(("reads", reads, overlapping))
    s.close()


@pytest.mark.timeout(90)
def test_two_processes_write_and_read_at_once(store: SqliteStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    # A barrier, not an event set by this process: spawned children take a while to import, and
    # under load the writer could otherwise finish before the reader had even opened the store.
    results, start, seen, done = ctx.Queue(), ctx.Barrier(2), ctx.Event(), ctx.Event()
    path = str(store.path)
    procs = [
        ctx.Process(target=_writer, args=(path, start, seen, done)),
        ctx.Process(target=_reader, args=(path, start, seen, done, results)),
    ]
    for p in procs:
        p.start()
    found = [results.get(timeout=80)]
    while found[-1][0] != "reads":
        found.append(results.get(timeout=80))
    for p in procs:
        p.join(timeout=30)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a process hung"
    assert [p.exitcode for p in procs] == [0, 0]
    *errors, (_, reads, overlapping) = found
    assert errors == []
    # They really ran at the same time: the reader saw the writer's instances come and go.
    assert overlapping > 0 and reads > 0
    assert len([i for i in store.instances() if i.project_id == "pw"]) == ROUNDS // 2
    assert os.path.exists(path)


def test_read_failures_are_store_errors(store: SqliteStore) -> None:
    """The agent catches StoreError, not sqlite3's tree: every read path translates."""
    store.close()
    for read in (
        lambda: store.ports_by_ip(["net1"], "169.254.10.5"),
        lambda: store.ports_by_mac(["net1"], "fa:16:3e:00:00:01"),
        lambda: store.router_networks("r1"),
        store.data_version,
        lambda: store.instance_view(UUID1),
    ):
        with pytest.raises(StoreError):
            read()
