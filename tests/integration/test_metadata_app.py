"""The metadata server's answers: a table of paths → statuses and bodies, both trees, every
identity case, tokens, passwords and hostile paths (MetadataApp over a real SQLite store)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metaproxy.metadata import ec2, openstack, server
from metaproxy.metadata.server import MetadataApp
from metaproxy.metadata.store import SqliteStore
from metaproxy.metadata.tokens import TokenIssuer
from support.metadata import (
    KEY1,
    KEY2,
    PROJECT1,
    PROJECT2,
    SECRET,
    USER_DATA,
    VM1,
    VM2,
    identity,
    make_store,
)

EC2_VERSIONS = "\n".join([*ec2.VERSIONS, "latest"]).encode()
OS_VERSIONS = "\n".join([*openstack.VERSIONS, "latest"]).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(short_tmp: Path) -> Iterator[SqliteStore]:
    s = make_store(short_tmp / "metaproxy.db")
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def app_for(store: SqliteStore, clock: Clock, mode: Any = "optional") -> MetadataApp:
    return MetadataApp(store, SECRET, mode, issuer=TokenIssuer(b"k" * 32), clock=clock)


@pytest.fixture
def app(store: SqliteStore, clock: Clock) -> MetadataApp:
    return app_for(store, clock)


def get(app: MetadataApp, path: str, headers: list[tuple[bytes, bytes]] | None = None,
        method: str = "GET", body: bytes = b"") -> tuple[int, bytes]:  # fmt: skip
    answer = app.handle(method, path.encode(), identity() if headers is None else headers, body)
    return answer.status, answer.body


VM1_META_KEYS = {
    "uuid", "meta", "hostname", "name", "launch_index", "availability_zone", "public_keys",
    "keys", "random_seed", "project_id", "devices",
}  # fmt: skip

TABLE = [
    ("/", 200, EC2_VERSIONS),
    ("/openstack", 200, OS_VERSIONS),
    ("/openstack/", 200, OS_VERSIONS),
    (
        "/openstack/latest/",
        200,
        b"meta_data.json\nuser_data\npassword\nvendor_data.json\nnetwork_data.json\nvendor_data2.json",
    ),
    ("/openstack/2012-08-10", 200, b"meta_data.json\nuser_data"),
    ("/openstack/2013-10-17", 200, b"meta_data.json\nuser_data\npassword\nvendor_data.json"),
    ("/openstack/2018-08-27/user_data", 200, USER_DATA),
    ("/openstack/latest/vendor_data.json", 200, b'{"cloud-init": "#cloud-config\\n{}"}'),
    ("/openstack/latest/vendor_data2.json", 200, b'{"static": {"hello": "world"}}'),
    ("/openstack/latest/password", 200, b""),
    ("/openstack/2013-10-17/network_data.json", 404, None),
    ("/openstack/2099-01-01/meta_data.json", 404, None),
    ("/openstack/latest/nope.json", 404, None),
    ("/openstack/latest/meta_data.json/extra", 404, None),
    ("/2009-04-04", 200, b"dynamic/\nmeta-data/\nuser-data"),
    (
        "/latest/meta-data/",
        200,
        b"ami-launch-index\nhostname\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\n"
        b"mac\nplacement/\npublic-keys/",
    ),
    ("/2009-04-04/meta-data", 200, None),  # the slash is optional on directories
    ("/2009-04-04/meta-data/instance-id", 200, VM1.encode()),
    ("/2009-04-04/meta-data/instance-id/", 200, VM1.encode()),
    ("/latest/meta-data/ami-launch-index", 200, b"2"),
    ("/latest/meta-data/hostname", 200, b"web-1"),
    ("/latest/meta-data/local-hostname", 200, b"web-1"),
    ("/latest/meta-data/local-ipv4", 200, b"169.254.20.10"),
    ("/latest/meta-data/instance-type", 200, b"m1.tiny"),
    ("/latest/meta-data/mac", 200, b"fa:16:3e:11:22:33"),
    ("/latest/meta-data/placement/", 200, b"availability-zone"),
    ("/latest/meta-data/placement/availability-zone", 200, b"zone-1a"),
    ("/latest/meta-data/public-keys/", 200, b"0=first\n1=second"),
    ("/latest/meta-data/public-keys/0/", 200, b"openssh-key"),
    ("/latest/meta-data/public-keys/0/openssh-key", 200, KEY1.encode()),
    ("/latest/meta-data/public-keys/1/openssh-key", 200, KEY2.encode()),
    ("/latest/meta-data/public-keys/2/openssh-key", 404, None),
    ("/latest/user-data", 200, USER_DATA),
    ("/latest/user-data/", 200, USER_DATA),  # as ec2-metadata asks for it
    ("/2009-04-04/dynamic/", 200, b"instance-identity/"),
    ("/latest/dynamic/instance-identity/", 200, b"document"),
    ("/2021-03-23/meta-data/instance-id", 404, None),  # cloud-init's probe → falls back
    ("/latest/meta-data/nope", 404, None),
    ("/nope", 404, None),
    # Hostile paths: never resolved, never another tree, never a file.
    ("/openstack/../latest/meta-data/instance-id", 404, None),
    ("/openstack/latest/..%2F..%2Fetc%2Fpasswd", 404, None),
    ("/openstack/%2e%2e/%2e%2e/etc/passwd", 404, None),
    ("/latest/meta-data/./instance-id", 404, None),
    ("/openstack/latest/meta_data.json%00", 404, None),
    ("/latest/meta-data/instance-id\u00e9", 404, None),
    ("//openstack//latest//user_data", 200, USER_DATA),
    ("/latest/meta-data/instance-id?x=../../", 200, VM1.encode()),
]


@pytest.mark.parametrize(
    ("path", "status", "body"), [pytest.param(*row, id=row[0]) for row in TABLE]
)
def test_paths(app: MetadataApp, path: str, status: int, body: bytes | None) -> None:
    got_status, got_body = get(app, path)
    assert got_status == status, got_body
    if body is not None:
        assert got_body == body


def test_meta_data_json(app: MetadataApp) -> None:
    status, body = get(app, "/openstack/latest/meta_data.json")
    doc = json.loads(body)
    assert status == 200 and set(doc) == VM1_META_KEYS
    assert doc["uuid"] == VM1 and doc["project_id"] == PROJECT1
    assert doc["hostname"] == "web-1" and doc["launch_index"] == 2
    assert doc["availability_zone"] == "zone-1a"
    assert doc["meta"] == {"role": "web", "dsmode": "net"}
    assert doc["public_keys"] == {"first": KEY1, "second": KEY2}
    assert doc["keys"][0] == {"name": "first", "type": "ssh", "data": KEY1}
    assert len(base64.b64decode(doc["random_seed"], validate=True)) == 512
    old = json.loads(get(app, "/openstack/2012-08-10/meta_data.json")[1])
    assert "random_seed" not in old and "project_id" not in old and "keys" not in old


def test_bare_instance(app: MetadataApp) -> None:
    headers = identity(VM2, PROJECT2)
    doc = json.loads(get(app, "/openstack/latest/meta_data.json", headers)[1])
    assert "public_keys" not in doc and doc["hostname"] == "bare"
    assert get(app, "/openstack/latest/user_data", headers)[0] == 404
    assert get(app, "/latest/user-data", headers)[0] == 404
    assert get(app, "/openstack/latest", headers)[1].split(b"\n")[:2] == [
        b"meta_data.json",
        b"password",
    ]
    listing = get(app, "/latest/meta-data/", headers)[1].split(b"\n")
    assert b"public-keys/" not in listing and b"local-ipv4" in listing
    network = json.loads(get(app, "/openstack/latest/network_data.json", headers)[1])
    assert network["networks"][0]["type"] == "ipv4_dhcp"  # no subnet known: DHCP


def test_generated_network_data(app: MetadataApp) -> None:
    doc = json.loads(get(app, "/openstack/latest/network_data.json")[1])
    assert doc["links"] == [
        {
            "id": "tapport-1",
            "vif_id": "port-1",
            "type": "phy",
            "mtu": 1450,
            "ethernet_mac_address": "fa:16:3e:11:22:33",
        }
    ]
    # The IPv6 link-local address is not configured; the v4 one is static with its route.
    assert doc["networks"] == [
        {
            "id": "network0",
            "link": "tapport-1",
            "network_id": "net-a",
            "type": "ipv4",
            "ip_address": "169.254.20.10",
            "netmask": "255.255.255.0",
            "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "169.254.20.1"}],
            "services": [],
        }
    ]


def test_identity_document(app: MetadataApp) -> None:
    status, body = get(app, "/latest/dynamic/instance-identity/document")
    doc = json.loads(body)
    assert status == 200 and doc["instanceId"] == VM1 and doc["region"] == "zone-1"
    assert doc["privateIp"] == "169.254.20.10" and doc["availabilityZone"] == "zone-1a"


def _without(name: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in identity() if k.lower() != name]


SIGNATURE_CASES = [
    pytest.param(_without(b"x-instance-id"), 400, id="no-instance-id"),
    pytest.param(_without(b"x-tenant-id"), 400, id="no-tenant-id"),
    pytest.param(_without(b"x-instance-id-signature"), 400, id="no-signature"),
    pytest.param([], 400, id="no-identity-at-all"),
    pytest.param([*identity(), (b"x-instance-id", VM2.encode())], 400, id="instance-id-twice"),
    pytest.param([*identity(), (b"X-TENANT-ID", PROJECT1.encode())], 400, id="tenant-twice"),
    pytest.param([*identity(), (b"x-instance-id-signature", b"0" * 64)], 400, id="signature-twice"),
    pytest.param(
        [*_without(b"x-instance-id-signature"), (b"X-Instance-ID-Signature", b"0" * 64)],
        403,
        id="bad-signature",
    ),
    pytest.param(
        [*_without(b"x-instance-id-signature"), (b"X-Instance-ID-Signature", b"")],
        400,
        id="empty-signature",
    ),
    pytest.param(
        [*_without(b"x-instance-id"), (b"X-Instance-ID", VM2.encode())],
        403,
        id="signature-of-another-instance",
    ),
    pytest.param(identity(VM1, PROJECT2), 404, id="another-project"),
    pytest.param(identity("7e57e57e-0000-4000-8000-000000000000"), 404, id="unknown-instance"),
    pytest.param(identity("not-a-uuid"), 404, id="malformed-instance-id"),
    pytest.param([(k.lower(), v) for k, v in identity()], 200, id="header-names-any-case"),
]


@pytest.mark.parametrize("path", ["/openstack", "/latest/meta-data/instance-id", "/nope"])
@pytest.mark.parametrize(("headers", "status"), SIGNATURE_CASES)
def test_identity_checks(
    app: MetadataApp, path: str, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    expected = 404 if (status == 200 and path == "/nope") else status
    got, body = get(app, path, headers)
    assert got == expected
    if status != 200:
        assert VM1.encode() not in body and len(body) < 40  # short and generic


def test_root_needs_no_identity(app: MetadataApp) -> None:
    assert get(app, "/", []) == (200, EC2_VERSIONS)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        pytest.param("DELETE", "/openstack/latest/meta_data.json", 405, id="delete"),
        pytest.param("POST", "/openstack/latest/meta_data.json", 405, id="post-meta-data"),
        pytest.param("POST", "/latest/meta-data/instance-id", 405, id="post-ec2"),
        pytest.param("PUT", "/latest/meta-data/instance-id", 405, id="put-ec2"),
        pytest.param("POST", "/", 405, id="post-root"),
        pytest.param("GET", "/latest/api/token", 405, id="get-token"),
        pytest.param("HEAD", "/openstack/latest/meta_data.json", 200, id="head"),
        pytest.param("PUT", "/openstack/latest/password", 405, id="put-password"),
    ],
)
def test_methods(app: MetadataApp, method: str, path: str, status: int) -> None:
    assert get(app, path, method=method)[0] == status


def test_password_is_stored_once(app: MetadataApp, store: SqliteStore) -> None:
    assert get(app, "/openstack/latest/password", method="POST", body=b"x" * 1021)[0] == 400
    assert get(app, "/openstack/latest/password", method="POST", body=b"\xff")[0] == 400
    assert get(app, "/openstack/latest/password", method="POST", body=b"enc-pw") == (200, b"")
    assert get(app, "/openstack/latest/password") == (200, b"enc-pw")
    assert get(app, "/openstack/latest/password", method="POST", body=b"again")[0] == 409
    assert get(app, "/openstack/2012-08-10/password", method="POST", body=b"x")[0] == 404
    view = store.instance_view(VM1)
    assert view is not None and view.instance.password == "enc-pw"  # noqa: S105


def test_answers_follow_store_changes(app: MetadataApp, short_tmp: Path) -> None:
    assert get(app, "/latest/meta-data/hostname")[1] == b"web-1"
    other = SqliteStore(short_tmp / "metaproxy.db")  # another process's view: the admin CLI
    other.remove_instance(VM1, with_ports=True)
    other.close()
    time.sleep(server.REFRESH)  # the store is asked about changes at most this often
    assert get(app, "/latest/meta-data/hostname")[0] == 404


# -- tokens ---------------------------------------------------------------------------------------

TTL = b"X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = b"X-aws-ec2-metadata-token"


def put_token(app: MetadataApp, ttl: bytes = b"60", headers: Any = None) -> tuple[int, bytes]:
    base = identity() if headers is None else headers
    answer = app.handle("PUT", b"/latest/api/token", [*base, (TTL, ttl)])
    if answer.status == 200:
        assert (TTL.lower(), ttl) in answer.headers
    return answer.status, answer.body


@pytest.mark.parametrize(
    ("ttl", "status"),
    [
        pytest.param(b"1", 200, id="min"),
        pytest.param(b"21600", 200, id="max"),
        pytest.param(b"0", 400, id="zero"),
        pytest.param(b"21601", 400, id="over"),
        pytest.param(b"-5", 400, id="negative"),
        pytest.param(b"abc", 400, id="text"),
        pytest.param(b"", 400, id="empty"),
        pytest.param(b"99999999999999999999", 400, id="huge"),
    ],
)
def test_token_ttl(app: MetadataApp, ttl: bytes, status: int) -> None:
    assert put_token(app, ttl)[0] == status


def test_token_put_needs_ttl_and_identity(app: MetadataApp) -> None:
    assert app.handle("PUT", b"/latest/api/token", identity()).status == 400
    assert put_token(app, headers=[])[0] == 400
    assert put_token(app, headers=identity(VM1, PROJECT2))[0] == 404


def test_token_flow_optional(app: MetadataApp, clock: Clock) -> None:
    status, token = put_token(app, b"60")
    assert status == 200 and token.startswith(b"v1.")
    with_token = [*identity(), (TOKEN, token)]
    assert get(app, "/latest/meta-data/instance-id", with_token) == (200, VM1.encode())
    assert get(app, "/latest/meta-data/instance-id")[0] == 200  # optional: no token is fine
    assert get(app, "/latest/meta-data/instance-id", [*identity(), (TOKEN, b"v1.AAAA")])[0] == 401
    assert get(app, "/latest/meta-data/instance-id", [*with_token, (TOKEN, token)])[0] == 400
    # Another instance cannot use it, even with its own valid identity.
    other = [*identity(VM2, PROJECT2), (TOKEN, token)]
    assert get(app, "/latest/meta-data/instance-id", other)[0] == 401
    clock.now += 59
    assert get(app, "/latest/meta-data/instance-id", with_token)[0] == 200
    clock.now += 1
    assert get(app, "/latest/meta-data/instance-id", with_token)[0] == 401


def test_token_required(store: SqliteStore, clock: Clock) -> None:
    app = app_for(store, clock, "required")
    assert get(app, "/latest/meta-data/instance-id")[0] == 401
    assert get(app, "/openstack/latest/meta_data.json")[0] == 401
    assert get(app, "/", [])[0] == 200
    token = put_token(app)[1]
    assert get(app, "/openstack", [*identity(), (TOKEN, token)])[0] == 200


def test_token_off(store: SqliteStore, clock: Clock) -> None:
    app = app_for(store, clock, "off")
    assert put_token(app)[0] == 404  # clients (botocore, cloud-init) then go on without one
    assert get(app, "/latest/meta-data/instance-id", [*identity(), (TOKEN, b"junk")])[0] == 200


def test_a_token_outlives_a_restart_of_the_server(store: SqliteStore, clock: Clock) -> None:
    """The key comes from the shared secret: a new server (a restart, or another server of the
    deployment) takes the token; an issuer with another key does not."""
    token = put_token(MetadataApp(store, SECRET, "optional", clock=clock))[1]
    restarted = MetadataApp(store, SECRET, "optional", clock=clock)
    with_token = [*identity(), (TOKEN, token)]
    assert get(restarted, "/latest/meta-data/instance-id", with_token) == (200, VM1.encode())
    assert get(app_for(store, clock), "/latest/meta-data/instance-id", with_token)[0] == 401


def test_own_password_write_is_seen_at_once(store: SqliteStore, clock: Clock) -> None:
    """However rarely the store is polled for others' changes, the server's own write shows."""
    app = MetadataApp(store, SECRET, "optional", clock=clock, refresh=3600)
    assert get(app, "/openstack/latest/password") == (200, b"")
    assert get(app, "/openstack/latest/password", method="POST", body=b"pw")[0] == 200
    assert get(app, "/openstack/latest/password") == (200, b"pw")
