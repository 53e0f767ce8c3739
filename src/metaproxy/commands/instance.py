"""`metaproxy instance add|list|show|remove`: instances in the embedded store."""

from __future__ import annotations

import argparse
import base64
import json
import uuid
from typing import Any

from metaproxy.commands import storeargs
from metaproxy.errors import ConfigError, StoreError
from metaproxy.metadata import model

NAME = "instance"
HELP = "add, list, show or remove instances in the embedded store"


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser("add", help="add an instance (prints its UUID)")
    storeargs.flag(add, "uuid", help="instance UUID (default: a new random one)")
    storeargs.flag(add, "project_id", "--project", required=True, help="project (tenant) ID")
    storeargs.flag(add, "name", required=True, help="display name")
    storeargs.flag(add, "hostname", help="hostname (default: derived from the name)")
    storeargs.flag(add, "availability_zone", "--az", default="nova", help="default: nova")
    storeargs.flag(add, "launch_index", type=int, default=0, help="default: 0")
    storeargs.flag(add, "instance_type", "--flavor", default="m1.small", help="default: m1.small")
    storeargs.flag(add, "user_data", metavar="FILE", help="user data file ('-' for stdin)")
    storeargs.flag(
        add, "meta", metavar="KEY=VALUE", action="append", default=[], help="metadata item"
    )
    storeargs.flag(
        add,
        "public_key",
        metavar="NAME=KEY",
        action="append",
        default=[],
        help="public key; KEY may be @FILE (repeat: the first one is EC2's key 0)",
    )
    storeargs.flag(add, "network_data", metavar="FILE", help="network_data.json to serve as is")
    storeargs.flag(add, "vendor_data", metavar="FILE", help="vendor_data.json (a JSON object)")
    storeargs.flag(add, "vendor_data2", metavar="FILE", help="vendor_data2.json (a JSON object)")

    listing = actions.add_parser("list", help="list instances")
    storeargs.add_json_flag(listing)

    show = actions.add_parser("show", help="show one instance (the password is never printed)")
    show.add_argument("uuid")

    remove = actions.add_parser("remove", help="remove instances")
    remove.add_argument("uuids", nargs="+", metavar="UUID")
    storeargs.flag(remove, "with_ports", action="store_true", help="remove their ports too")

    for sub in (add, listing, show, remove):
        storeargs.add_store_flags(sub)


def _pair(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{what}: {text!r} is not NAME=VALUE", key=what)
    return key, value


def _json_file(path: str, what: str) -> Any:
    try:
        return json.loads(storeargs.read_input(path, what))
    except ValueError as exc:
        raise ConfigError(f"{what}: {path} is not valid JSON: {exc}", key=what) from exc


def document_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as an import-style document, so they meet exactly the import's checks."""
    doc: dict[str, Any] = {
        "uuid": args.uuid or str(uuid.uuid4()),
        "project_id": args.project_id,
        "name": args.name,
        "availability_zone": args.availability_zone,
        "launch_index": args.launch_index,
        "instance_type": args.instance_type,
        "meta": dict(_pair(item, "meta") for item in args.meta),
    }
    if args.hostname:
        doc["hostname"] = args.hostname
    if args.user_data:
        # Any bytes are valid user data; the model checks the size.
        raw = storeargs.read_input(args.user_data, "user_data", limit=model.MAX_USER_DATA)
        doc["user_data_base64"] = base64.b64encode(raw).decode("ascii")
    keys = []
    for item in args.public_key:
        name, key = _pair(item, "public_key")
        if key.startswith("@"):
            key = storeargs.read_input(key[1:], "public_key", limit=16384).decode(
                "utf-8", "replace"
            )
        keys.append({"name": name, "data": key})
    doc["public_keys"] = keys
    for name in ("network_data", "vendor_data", "vendor_data2"):
        if getattr(args, name):
            doc[name] = _json_file(getattr(args, name), name)
    return doc


def run(args: argparse.Namespace) -> int:
    if args.action == "add":
        instance = model.instance_from_mapping(document_from_args(args))
        with _store(args) as store:
            store.add_instance(instance)
        print(instance.uuid)
    elif args.action == "list":
        _list(args)
    elif args.action == "show":
        uuid_ = model.check_uuid(args.uuid, "uuid")
        with _store(args) as store:
            found = store.instance(uuid_)
            ports = store.ports(instance_id=uuid_)
        if found is None:
            raise StoreError(f"uuid: no instance {uuid_}", field="uuid")
        doc = model.instance_to_mapping(found, secrets=False)
        doc["password_set"] = bool(found.password)
        doc["ports"] = [model.port_to_mapping(p) for p in ports]
        storeargs.print_json(doc)
    else:
        uuids = [model.check_uuid(u, "uuid") for u in args.uuids]
        with _store(args) as store:
            with store.transaction():
                for uuid_ in uuids:
                    store.remove_instance(uuid_, with_ports=args.with_ports)
    return 0


def _list(args: argparse.Namespace) -> None:
    with _store(args) as store:
        instances = store.instances()
        ports = store.ports()
    addresses: dict[str, list[str]] = {}
    for port in ports:
        addresses.setdefault(port.instance_id, []).extend(port.fixed_ips)
    if args.json:
        storeargs.print_json(
            [
                {
                    **model.instance_to_mapping(i, secrets=False),
                    "addresses": addresses.get(i.uuid, []),
                }
                for i in instances
            ]
        )
        return
    rows = [
        (
            i.uuid,
            i.name,
            i.project_id,
            i.availability_zone,
            ",".join(addresses.get(i.uuid, [])) or "-",
        )
        for i in instances
    ]
    storeargs.print_table(("UUID", "NAME", "PROJECT", "AZ", "ADDRESSES"), rows)


_store = storeargs.opened
