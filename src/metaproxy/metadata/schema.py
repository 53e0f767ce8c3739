"""The SQLite schema, as an ordered list of migrations; PRAGMA user_version counts those applied.

Append a migration to change the schema; never edit one that has shipped.
"""

from __future__ import annotations

# Migration N (1-based) takes a store from user_version N-1 to N.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE networks (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL DEFAULT '',
        project_id  TEXT NOT NULL DEFAULT '',
        mtu         INTEGER,
        subnets     TEXT NOT NULL DEFAULT '[]'
    ) WITHOUT ROWID;

    CREATE TABLE routers (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL DEFAULT '',
        project_id  TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID;

    CREATE TABLE router_networks (
        router_id   TEXT NOT NULL REFERENCES routers(id) ON DELETE CASCADE,
        network_id  TEXT NOT NULL REFERENCES networks(id) ON DELETE RESTRICT,
        PRIMARY KEY (router_id, network_id)
    ) WITHOUT ROWID;
    CREATE INDEX router_networks_by_network ON router_networks(network_id);

    CREATE TABLE instances (
        uuid               TEXT PRIMARY KEY,
        project_id         TEXT NOT NULL,
        name               TEXT NOT NULL,
        hostname           TEXT NOT NULL,
        availability_zone  TEXT NOT NULL,
        launch_index       INTEGER NOT NULL,
        instance_type      TEXT NOT NULL,
        user_data          BLOB,
        meta               TEXT NOT NULL DEFAULT '{}',
        public_keys        TEXT NOT NULL DEFAULT '[]',
        network_data       TEXT,
        vendor_data        TEXT NOT NULL DEFAULT '{}',
        vendor_data2       TEXT NOT NULL DEFAULT '{}',
        password           TEXT
    );

    CREATE TABLE ports (
        id           TEXT PRIMARY KEY,
        network_id   TEXT NOT NULL REFERENCES networks(id) ON DELETE RESTRICT,
        mac          TEXT NOT NULL,
        instance_id  TEXT NOT NULL REFERENCES instances(uuid) ON DELETE RESTRICT,
        project_id   TEXT NOT NULL,
        UNIQUE (network_id, mac)
    );
    CREATE INDEX ports_by_instance ON ports(instance_id);

    -- network_id is copied from the port so that (network, ip) can be unique and indexed:
    -- the agent's hot lookup is one index probe per candidate network.
    CREATE TABLE fixed_ips (
        port_id     TEXT NOT NULL REFERENCES ports(id) ON DELETE CASCADE,
        network_id  TEXT NOT NULL,
        ip          TEXT NOT NULL,
        position    INTEGER NOT NULL,
        PRIMARY KEY (network_id, ip)
    ) WITHOUT ROWID;
    CREATE INDEX fixed_ips_by_port ON fixed_ips(port_id);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
