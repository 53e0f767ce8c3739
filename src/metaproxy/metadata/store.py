"""The store: networks, routers, ports and instances, in SQLite by default.

`Store` is the interface (the agent sees only its `PortDirectory` part); `SqliteStore` is the
embedded implementation. Contract:
- every write runs in one `BEGIN IMMEDIATE` transaction: a refused command changes nothing;
- every multi-row read runs in one read transaction: a reader in another process (agent, metadata
  server) sees an instance with all of its ports, or not at all (WAL gives readers a snapshot);
- GETs never write; `data_version()` changes whenever anything was committed, by any process,
  so a server may cache what it read until then.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from metaproxy.errors import StoreError
from metaproxy.metadata import model
from metaproxy.metadata.model import Instance, Inventory, Network, Port, PublicKey, Router, Subnet
from metaproxy.metadata.records import PortDirectory, PortMatch
from metaproxy.metadata.schema import MIGRATIONS

log = logging.getLogger(__name__)

DEFAULT_FILENAME = "metaproxy.db"
BUSY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance with its ports and their networks: what the metadata server renders."""

    instance: Instance
    ports: tuple[tuple[Port, Network], ...]


class Store(PortDirectory, Protocol):
    """What the admin commands and the metadata server need; SQLite now, a server DB later."""

    def add_network(self, network: Network) -> None: ...
    def remove_network(self, network_id: str) -> None: ...
    def networks(self) -> list[Network]: ...
    def add_router(self, router: Router) -> None: ...
    def remove_router(self, router_id: str) -> None: ...
    def attach(self, router_id: str, network_id: str) -> None: ...
    def detach(self, router_id: str, network_id: str) -> None: ...
    def routers(self) -> list[Router]: ...
    def add_instance(self, instance: Instance) -> None: ...
    def remove_instance(self, uuid: str, *, with_ports: bool = False) -> None: ...
    def instance(self, uuid: str) -> Instance | None: ...
    def instances(self) -> list[Instance]: ...
    def add_port(self, port: Port) -> Port: ...
    def remove_port(self, port_id: str) -> None: ...
    def ports(
        self, *, network_id: str | None = None, instance_id: str | None = None
    ) -> list[Port]: ...
    def import_inventory(self, inventory: Inventory, *, replace: bool = False) -> None: ...
    def export_inventory(self) -> Inventory: ...
    def instance_view(self, uuid: str) -> InstanceView | None: ...
    def set_password(self, uuid: str, password: str) -> bool: ...
    def data_version(self) -> tuple[int, int]: ...
    def data_version_local(self) -> int: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _create_private_file(path: Path) -> None:
    """Create the database file 0600 (it holds user data and passwords), refusing symlinks."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open store {path}: {exc.strerror}", field="store") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"store {path} is not a regular file", field="store")
    finally:
        os.close(fd)


class SqliteStore:
    """The embedded store: one SQLite file in WAL mode; safe to share between threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        _create_private_file(self.path)
        self._lock = threading.RLock()
        self._local_writes = 0
        try:
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}", field="store") from exc
        self._migrate()

    # -- plumbing -----------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"store {self.path} has schema version {version}, newer than this "
                    f"metaproxy knows ({len(MIGRATIONS)})",
                    field="store",
                )
            for number in range(version + 1, len(MIGRATIONS) + 1):
                # executescript would COMMIT our transaction; run statement by statement.
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number:d}")
                log.info("store %s: migrated to schema version %d", self.path, number)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several writes into one transaction: all of them happen, or none."""
        with self._write():
            yield

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db.in_transaction:  # inside transaction(): the outer one commits
                yield self._db
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path} is busy or unreadable: {exc}") from exc
            try:
                yield self._db
                self._db.execute("COMMIT")
                self._local_writes += 1
            except BaseException as exc:
                # SQLite rolls back by itself on SQLITE_FULL / IOERR: a second ROLLBACK would
                # raise "no transaction is active" and hide the real cause.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"cannot write store {self.path}: {exc}") from exc
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                nested = self._db.in_transaction
                if not nested:
                    self._db.execute("BEGIN")
                try:
                    yield self._db
                finally:
                    if not nested:
                        self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read store {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """One statement outside any explicit transaction (SQLite makes it atomic)."""
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read store {self.path}: {exc}") from exc

    def data_version(self) -> tuple[int, int]:
        """Changes whenever a commit happened: (other connections', this connection's)."""
        return self._query("PRAGMA data_version")[0][0], self._local_writes

    def data_version_local(self) -> int:
        """The second half of data_version(), without asking SQLite (this connection's commits)."""
        return self._local_writes

    # -- PortDirectory (the agent's hot path: one indexed probe per network) -------------------

    def ports_by_ip(self, network_ids: Sequence[str], ip: str) -> list[PortMatch]:
        if not network_ids:
            return []
        marks = ",".join("?" * len(network_ids))
        rows = self._query(_BY_IP.format(marks=marks), (*network_ids, ip))
        return [PortMatch(*row) for row in rows]

    def ports_by_mac(self, network_ids: Sequence[str], mac: str) -> list[PortMatch]:
        if not network_ids:
            return []
        marks = ",".join("?" * len(network_ids))
        rows = self._query(_BY_MAC.format(marks=marks), (*network_ids, mac))
        return [PortMatch(*row) for row in rows]

    def router_networks(self, router_id: str) -> list[str]:
        rows = self._query(
            "SELECT network_id FROM router_networks WHERE router_id = ? ORDER BY network_id",
            (router_id,),
        )
        return [row[0] for row in rows]

    # -- networks and routers -----------------------------------------------------------------

    def add_network(self, network: Network) -> None:
        with self._write() as db:
            self._insert_network(db, network, "network")

    def _insert_network(self, db: sqlite3.Connection, n: Network, where: str) -> None:
        if _exists(db, "SELECT 1 FROM networks WHERE id = ?", n.id):
            raise StoreError(f"{where}.id: network {n.id!r} already exists", field=f"{where}.id")
        subnets = [{"cidr": s.cidr, "gateway": s.gateway} for s in n.subnets]
        db.execute(
            "INSERT INTO networks (id, name, project_id, mtu, subnets) VALUES (?, ?, ?, ?, ?)",
            (n.id, n.name, n.project_id, n.mtu, _dumps(subnets)),
        )

    def remove_network(self, network_id: str) -> None:
        with self._write() as db:
            _must_exist(db, "networks", "id", network_id, "network_id")
            users = db.execute(
                "SELECT id FROM ports WHERE network_id = ? ORDER BY id LIMIT 5", (network_id,)
            ).fetchall()
            if users:
                names = ", ".join(r[0] for r in users)
                raise StoreError(
                    f"network_id: network {network_id!r} still has ports ({names}); remove them "
                    "first",
                    field="network_id",
                )
            routers = db.execute(
                "SELECT router_id FROM router_networks WHERE network_id = ?", (network_id,)
            ).fetchall()
            if routers:
                names = ", ".join(r[0] for r in routers)
                raise StoreError(
                    f"network_id: network {network_id!r} is attached to router(s) {names}; "
                    "detach it first",
                    field="network_id",
                )
            db.execute("DELETE FROM networks WHERE id = ?", (network_id,))

    def networks(self) -> list[Network]:
        with self._read():
            return self._networks_now()

    def add_router(self, router: Router) -> None:
        with self._write() as db:
            self._insert_router(db, router, "router")

    def _insert_router(self, db: sqlite3.Connection, r: Router, where: str) -> None:
        if _exists(db, "SELECT 1 FROM routers WHERE id = ?", r.id):
            raise StoreError(f"{where}.id: router {r.id!r} already exists", field=f"{where}.id")
        db.execute(
            "INSERT INTO routers (id, name, project_id) VALUES (?, ?, ?)",
            (r.id, r.name, r.project_id),
        )
        for i, network_id in enumerate(r.networks):
            _must_exist(db, "networks", "id", network_id, f"{where}.networks[{i}]")
            db.execute("INSERT INTO router_networks VALUES (?, ?)", (r.id, network_id))

    def remove_router(self, router_id: str) -> None:
        with self._write() as db:
            _must_exist(db, "routers", "id", router_id, "router_id")
            db.execute("DELETE FROM routers WHERE id = ?", (router_id,))

    def attach(self, router_id: str, network_id: str) -> None:
        with self._write() as db:
            _must_exist(db, "routers", "id", router_id, "router_id")
            _must_exist(db, "networks", "id", network_id, "network_id")
            if _exists(
                db,
                "SELECT 1 FROM router_networks WHERE router_id = ? AND network_id = ?",
                router_id,
                network_id,
            ):
                raise StoreError(
                    f"network_id: {network_id!r} is already attached to router {router_id!r}",
                    field="network_id",
                )
            db.execute("INSERT INTO router_networks VALUES (?, ?)", (router_id, network_id))

    def detach(self, router_id: str, network_id: str) -> None:
        with self._write() as db:
            _must_exist(db, "routers", "id", router_id, "router_id")
            gone = db.execute(
                "DELETE FROM router_networks WHERE router_id = ? AND network_id = ?",
                (router_id, network_id),
            ).rowcount
            if not gone:
                raise StoreError(
                    f"network_id: {network_id!r} is not attached to router {router_id!r}",
                    field="network_id",
                )

    def routers(self) -> list[Router]:
        with self._read():
            return self._routers_now()

    # -- instances ----------------------------------------------------------------------------

    def add_instance(self, instance: Instance) -> None:
        with self._write() as db:
            self._insert_instance(db, instance, "instance")

    def _insert_instance(self, db: sqlite3.Connection, i: Instance, where: str) -> None:
        if _exists(db, "SELECT 1 FROM instances WHERE uuid = ?", i.uuid):
            raise StoreError(
                f"{where}.uuid: instance {i.uuid} already exists", field=f"{where}.uuid"
            )
        db.execute(
            "INSERT INTO instances (uuid, project_id, name, hostname, availability_zone, "
            "launch_index, instance_type, user_data, meta, public_keys, network_data, "
            "vendor_data, vendor_data2, password) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                i.uuid,
                i.project_id,
                i.name,
                i.hostname,
                i.availability_zone,
                i.launch_index,
                i.instance_type,
                i.user_data,
                _dumps(dict(i.meta)),
                _dumps([[k.name, k.data] for k in i.public_keys]),
                None if i.network_data is None else _dumps(i.network_data),
                _dumps(i.vendor_data),
                _dumps(i.vendor_data2),
                i.password,
            ),
        )

    def remove_instance(self, uuid: str, *, with_ports: bool = False) -> None:
        with self._write() as db:
            _must_exist(db, "instances", "uuid", uuid, "uuid")
            ports = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM ports WHERE instance_id = ? ORDER BY id", (uuid,)
                )
            ]
            if ports and not with_ports:
                raise StoreError(
                    f"uuid: instance {uuid} still has ports ({', '.join(ports)}); remove them "
                    "first or pass --with-ports",
                    field="uuid",
                )
            db.execute("DELETE FROM ports WHERE instance_id = ?", (uuid,))
            db.execute("DELETE FROM instances WHERE uuid = ?", (uuid,))

    def instance(self, uuid: str) -> Instance | None:
        with self._read() as db:
            row = db.execute(_INSTANCE_SELECT + " WHERE uuid = ?", (uuid,)).fetchone()
            return None if row is None else _instance(row)

    def instances(self) -> list[Instance]:
        with self._read() as db:
            return [_instance(row) for row in db.execute(_INSTANCE_SELECT + " ORDER BY name, uuid")]

    def set_password(self, uuid: str, password: str) -> bool:
        """Store the password once (Nova's rule); False when one is already set."""
        model.check_password(password, "password")
        with self._write() as db:
            done = db.execute(
                "UPDATE instances SET password = ? WHERE uuid = ? AND "
                "(password IS NULL OR password = '')",
                (password, uuid),
            ).rowcount
            return bool(done)

    # -- ports --------------------------------------------------------------------------------

    def add_port(self, port: Port) -> Port:
        with self._write() as db:
            return self._insert_port(db, port, "port")

    def _insert_port(self, db: sqlite3.Connection, p: Port, where: str) -> Port:
        if _exists(db, "SELECT 1 FROM ports WHERE id = ?", p.id):
            raise StoreError(f"{where}.id: port {p.id!r} already exists", field=f"{where}.id")
        _must_exist(db, "networks", "id", p.network_id, f"{where}.network_id")
        row = db.execute("SELECT project_id FROM instances WHERE uuid = ?", (p.instance_id,))
        owner = row.fetchone()
        if owner is None:
            raise StoreError(
                f"{where}.instance_id: no instance {p.instance_id}", field=f"{where}.instance_id"
            )
        if p.project_id and p.project_id != owner[0]:
            # The agent sends the port's project as X-Tenant-ID; the server checks it against the
            # instance's: a mismatch would only ever produce 404s.
            raise StoreError(
                f"{where}.project_id: {p.project_id!r} is not the instance's project {owner[0]!r}",
                field=f"{where}.project_id",
            )
        p = replace(p, project_id=owner[0])
        clash = db.execute(
            "SELECT id FROM ports WHERE network_id = ? AND mac = ?", (p.network_id, p.mac)
        ).fetchone()
        if clash:
            raise StoreError(
                f"{where}.mac: {p.mac} is already used on network {p.network_id!r} by port "
                f"{clash[0]!r}",
                field=f"{where}.mac",
            )
        db.execute(
            "INSERT INTO ports (id, network_id, mac, instance_id, project_id) VALUES (?,?,?,?,?)",
            (p.id, p.network_id, p.mac, p.instance_id, p.project_id),
        )
        for position, ip in enumerate(p.fixed_ips):
            clash = db.execute(
                "SELECT port_id FROM fixed_ips WHERE network_id = ? AND ip = ?", (p.network_id, ip)
            ).fetchone()
            if clash:
                at = f"{where}.fixed_ips[{position}]"
                raise StoreError(
                    f"{at}: {ip} is already used on network {p.network_id!r} by port {clash[0]!r}",
                    field=at,
                )
            db.execute(
                "INSERT INTO fixed_ips (port_id, network_id, ip, position) VALUES (?,?,?,?)",
                (p.id, p.network_id, ip, position),
            )
        return p

    def remove_port(self, port_id: str) -> None:
        with self._write() as db:
            _must_exist(db, "ports", "id", port_id, "port_id")
            db.execute("DELETE FROM ports WHERE id = ?", (port_id,))

    def ports(self, *, network_id: str | None = None, instance_id: str | None = None) -> list[Port]:
        with self._read() as db:
            return self._ports(db, network_id=network_id, instance_id=instance_id)

    def _ports(
        self, db: sqlite3.Connection, *, network_id: str | None, instance_id: str | None
    ) -> list[Port]:
        query = "SELECT id, network_id, mac, instance_id, project_id FROM ports WHERE 1=1"
        params: list[str] = []
        if network_id is not None:
            query += " AND network_id = ?"
            params.append(network_id)
        if instance_id is not None:
            query += " AND instance_id = ?"
            params.append(instance_id)
        rows = db.execute(query + " ORDER BY rowid", params).fetchall()
        ports = []
        for pid, net, mac, inst, project in rows:
            ips = tuple(
                r[0]
                for r in db.execute(
                    "SELECT ip FROM fixed_ips WHERE port_id = ? ORDER BY position", (pid,)
                )
            )
            ports.append(Port(pid, net, mac, inst, ips, project))
        return ports

    # -- whole inventories --------------------------------------------------------------------

    def import_inventory(self, inventory: Inventory, *, replace: bool = False) -> None:
        """Add (or with `replace`, substitute) a whole inventory, all or nothing."""
        with self._write() as db:
            if replace:
                for table in ("fixed_ips", "ports", "router_networks", "routers", "instances"):
                    db.execute(f"DELETE FROM {table}")  # noqa: S608
                db.execute("DELETE FROM networks")
            for i, n in enumerate(inventory.networks):
                self._insert_network(db, n, f"networks[{i}]")
            for i, r in enumerate(inventory.routers):
                self._insert_router(db, r, f"routers[{i}]")
            for i, inst in enumerate(inventory.instances):
                self._insert_instance(db, inst, f"instances[{i}]")
            for i, p in enumerate(inventory.ports):
                self._insert_port(db, p, f"ports[{i}]")

    def export_inventory(self) -> Inventory:
        with self._read():
            # One snapshot for the whole document.
            return Inventory(
                networks=tuple(self._networks_now()),
                routers=tuple(self._routers_now()),
                instances=tuple(
                    _instance(r) for r in self._db.execute(_INSTANCE_SELECT + " ORDER BY uuid")
                ),
                ports=tuple(self._ports(self._db, network_id=None, instance_id=None)),
            )

    def _networks_now(self) -> list[Network]:
        return [_network(row) for row in self._db.execute(_NETWORK_SELECT + " ORDER BY id")]

    def _routers_now(self) -> list[Router]:
        links: dict[str, list[str]] = {}
        for router_id, network_id in self._db.execute(
            "SELECT router_id, network_id FROM router_networks ORDER BY router_id, network_id"
        ):
            links.setdefault(router_id, []).append(network_id)
        return [
            Router(rid, name, project, tuple(links.get(rid, ())))
            for rid, name, project in self._db.execute(
                "SELECT id, name, project_id FROM routers ORDER BY id"
            )
        ]

    def instance_view(self, uuid: str) -> InstanceView | None:
        """The instance, its ports and their networks, read in one snapshot."""
        with self._read() as db:
            row = db.execute(_INSTANCE_SELECT + " WHERE uuid = ?", (uuid,)).fetchone()
            if row is None:
                return None
            ports = self._ports(db, network_id=None, instance_id=uuid)
            networks = {
                r[0]: _network(r)
                for r in db.execute(
                    f"{_NETWORK_SELECT} WHERE id IN "  # noqa: S608
                    "(SELECT network_id FROM ports WHERE instance_id = ?)",
                    (uuid,),
                )
            }
            return InstanceView(_instance(row), tuple((p, networks[p.network_id]) for p in ports))


# -- row helpers --------------------------------------------------------------------------------

# `marks` is only ever "?,?,...": the values are bound parameters.
_BY_IP = (
    "SELECT p.id, p.network_id, p.instance_id, p.project_id FROM fixed_ips f "
    "JOIN ports p ON p.id = f.port_id WHERE f.network_id IN ({marks}) AND f.ip = ?"
)
_BY_MAC = (
    "SELECT id, network_id, instance_id, project_id FROM ports "
    "WHERE network_id IN ({marks}) AND mac = ?"
)
_NETWORK_SELECT = "SELECT id, name, project_id, mtu, subnets FROM networks"
_INSTANCE_SELECT = (
    "SELECT uuid, project_id, name, hostname, availability_zone, launch_index, instance_type, "
    "user_data, meta, public_keys, network_data, vendor_data, vendor_data2, password FROM instances"
)


def _network(row: Sequence[Any]) -> Network:
    subnets = tuple(Subnet(s["cidr"], s.get("gateway")) for s in json.loads(row[4]))
    return Network(row[0], row[1], row[2], row[3], subnets)


def _instance(row: Sequence[Any]) -> Instance:
    return Instance(
        uuid=row[0],
        project_id=row[1],
        name=row[2],
        hostname=row[3],
        availability_zone=row[4],
        launch_index=row[5],
        instance_type=row[6],
        user_data=None if row[7] is None else bytes(row[7]),
        meta=json.loads(row[8]),
        public_keys=tuple(PublicKey(n, d) for n, d in json.loads(row[9])),
        network_data=None if row[10] is None else json.loads(row[10]),
        vendor_data=json.loads(row[11]),
        vendor_data2=json.loads(row[12]),
        password=row[13],
    )


def _exists(db: sqlite3.Connection, query: str, *params: str) -> bool:
    return db.execute(query, params).fetchone() is not None


def _must_exist(db: sqlite3.Connection, table: str, column: str, value: str, where: str) -> None:
    if not _exists(db, f"SELECT 1 FROM {table} WHERE {column} = ?", value):  # noqa: S608
        kind = table.rstrip("s")
        raise StoreError(f"{where}: no {kind} {value!r}", field=where)


def open_store(path: Path | str) -> SqliteStore:
    """Open (creating and migrating as needed) the SQLite store at `path`."""
    return SqliteStore(path)
