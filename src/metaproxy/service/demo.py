"""`metaproxy up --demo`: a demo network, instance and (as root) namespaces, all removed at stop.

As root: a network namespace where the front listens on 169.254.169.254:80 and an instance
namespace joined to it by a veth pair, addressed link-local only (169.254.0.0/16). Without
root (no namespaces): the front listens on 127.0.0.1 on a free port and the demo instance is
127.0.0.1, so `curl` works from the same shell.
Everything it made — namespaces (their veth ends go with them) and store records — is removed by
`teardown`, which logs each failure and carries on.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from metaproxy.config import DEFAULT_METADATA_ADDRESS, Identity
from metaproxy.errors import MetaproxyError, NamespaceError
from metaproxy.security import exec as sexec
from metaproxy.service.settings import FrontEntry

log = logging.getLogger(__name__)

IP_CANDIDATES = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
INSTANCE_IP = "169.254.0.10"
DEMO_PROJECT = "demo-project"
USER_DATA = "#cloud-config\n# hello from the metaproxy demo\nhostname: demo-instance\n"
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyNotARealKeyJustForShow00000000 demo"


@dataclass
class Demo:
    """What the demo made; `setup` fills it in, `teardown` undoes it."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    records: list[tuple[str, str]] = field(default_factory=list)  # (kind, id) in creation order
    net_ns: str | None = None
    inst_ns: str | None = None
    bind_address: str = DEFAULT_METADATA_ADDRESS
    port: int = 80
    instance_ip: str = INSTANCE_IP
    instance_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    mac: str = field(
        default_factory=lambda: "fa:16:3e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
    )

    @property
    def network_id(self) -> str:
        return f"demo-net-{self.suffix}"

    @property
    def entry(self) -> FrontEntry:
        return FrontEntry(
            identity=Identity("network", self.network_id),
            netns=self.net_ns,
            bind_address=self.bind_address,
            port=self.port,
            source="demo",
        )

    # -- namespaces ---------------------------------------------------------------------------

    def make_namespaces(self) -> None:
        """Network namespace + instance namespace on a veth pair; link-local addresses only."""
        ip = str(sexec.find_binary(IP_CANDIDATES))
        self.net_ns, self.inst_ns = f"mp-demo-net-{self.suffix}", f"mp-demo-inst-{self.suffix}"
        net_if, inst_if = f"mpdn{self.suffix}", f"mpdi{self.suffix}"
        steps: list[tuple[str, ...]] = [
            ("netns", "add", self.net_ns),
            ("netns", "add", self.inst_ns),
            ("link", "add", net_if, "type", "veth", "peer", "name", inst_if),
            ("link", "set", net_if, "netns", self.net_ns),
            ("link", "set", inst_if, "netns", self.inst_ns),
            ("-n", self.inst_ns, "link", "set", inst_if, "address", self.mac),
            ("-n", self.net_ns, "addr", "add", f"{DEFAULT_METADATA_ADDRESS}/16", "dev", net_if),
            ("-n", self.inst_ns, "addr", "add", f"{self.instance_ip}/16", "dev", inst_if),
            ("-n", self.net_ns, "link", "set", "lo", "up"),
            ("-n", self.inst_ns, "link", "set", "lo", "up"),
            ("-n", self.net_ns, "link", "set", net_if, "up"),
            ("-n", self.inst_ns, "link", "set", inst_if, "up"),
        ]
        for step in steps:
            try:
                sexec.run([ip, *step], timeout=20)
            except MetaproxyError as exc:
                raise NamespaceError(f"demo: ip {' '.join(step)} failed: {exc}") from exc
            if step[:2] == ("netns", "add"):
                self.namespaces.append(step[2])

    def use_loopback(self) -> None:
        """No root, no namespaces: serve on 127.0.0.1 at a free port, the instance is 127.0.0.1."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.bind_address = self.instance_ip = "127.0.0.1"

    # -- store records ------------------------------------------------------------------------

    def add_records(self, store: Any) -> None:
        from metaproxy.metadata import model

        network = model.network_from_mapping({"id": self.network_id, "name": "demo network"})
        store.add_network(network)
        self.records.append(("network", self.network_id))
        instance = model.instance_from_mapping(
            {
                "uuid": self.instance_id,
                "project_id": DEMO_PROJECT,
                "name": "demo-instance",
                "user_data": USER_DATA,
                "meta": {"role": "demo"},
                "public_keys": [{"name": "demo", "data": PUBLIC_KEY}],
            }
        )
        store.add_instance(instance)
        self.records.append(("instance", self.instance_id))
        port = model.port_from_mapping(
            {
                "id": f"demo-port-{self.suffix}",
                "network_id": self.network_id,
                "mac": self.mac,
                "instance_id": self.instance_id,
                "fixed_ips": [self.instance_ip],
            }
        )
        store.add_port(port)
        self.records.append(("port", port.id))

    def setup(self, store: Any) -> FrontEntry:
        if os.geteuid() == 0:
            self.make_namespaces()
        else:
            log.warning("not root: the demo serves on 127.0.0.1 without network namespaces")
            self.use_loopback()
        self.add_records(store)
        return self.entry

    def teardown(self, store: Any | None) -> None:
        """Remove every record and namespace made; log what fails and carry on."""
        removers = {
            "port": "remove_port",
            "instance": "remove_instance",
            "network": "remove_network",
        }
        if store is not None:
            for kind, ident in reversed(self.records):
                try:
                    getattr(store, removers[kind])(ident)
                except Exception as exc:
                    log.error("demo: removing %s %s from the store failed: %s", kind, ident, exc)
        self.records.clear()
        if self.namespaces:
            ip = str(sexec.find_binary(IP_CANDIDATES))
            for ns in reversed(self.namespaces):
                try:
                    sexec.run([ip, "netns", "del", ns], timeout=20)
                except MetaproxyError as exc:
                    log.error("demo: deleting namespace %s failed: %s", ns, exc)
            self.namespaces.clear()

    def instructions(self, status_command: str) -> str:
        """The commands to try, printed once the stack is serving."""
        base = (
            f"http://{self.bind_address}"
            if self.port == 80
            else f"http://{self.bind_address}:{self.port}"
        )
        prefix = f"sudo ip netns exec {self.inst_ns} " if self.inst_ns else ""
        lines = [
            "",
            "metaproxy demo is serving. From the demo instance, try:",
            "",
            f"  {prefix}curl {base}/openstack/latest/meta_data.json",
            f"  {prefix}curl {base}/openstack/latest/user_data",
            f"  {prefix}curl {base}/latest/meta-data/",
            f"  {prefix}curl {base}/latest/meta-data/instance-id",
            "",
            f"instance {self.instance_id} (ip {self.instance_ip}, mac {self.mac}) "
            f"on network {self.network_id}",
            "The service's state (fronts, agent, server, counters):",
            "",
            f"  {status_command}",
            "",
            "Stop with Ctrl-C (or SIGTERM): the demo removes everything it made.",
            "",
        ]
        return "\n".join(lines)
