"""The admin commands: what they print, what they refuse, and that a refusal changes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaproxy import cli
from support import cli as runner

UUID1 = "11111111-1111-4111-8111-111111111111"


class Admin:
    """`metaproxy ...` in-process against one store file."""

    def __init__(self, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.store = store
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli.main([*argv, "--store", str(self.store)])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, err
        return out

    def export(self) -> Any:
        return json.loads(self.ok("export", "--format", "json"))


@pytest.fixture
def admin(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> Admin:
    a = Admin(short_tmp / "metaproxy.db", capsys)
    a.ok("network", "add", "--id", "net1", "--subnet", "169.254.10.0/24,169.254.10.1")
    a.ok("instance", "add", "--uuid", UUID1, "--project", "p1", "--name", "vm1")
    a.ok("port", "add", "--id", "port1", "--network", "net1", "--instance", UUID1,
         "--mac", "fa:16:3e:00:00:01", "--ip", "169.254.10.5")  # fmt: skip
    return a


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        pytest.param(
            ["port", "add", "--network", "nope", "--instance", UUID1, "--ip", "169.254.10.6"],
            "port.network_id",
            id="unknown-network",
        ),
        pytest.param(
            ["port", "add", "--network", "net1", "--instance", UUID1, "--ip", "169.254.10.5"],
            "port.fixed_ips[0]",
            id="duplicate-ip",
        ),
        pytest.param(
            ["instance", "add", "--uuid", "1234", "--project", "p1", "--name", "x"],
            "instance.uuid",
            id="malformed-uuid",
        ),
        pytest.param(
            ["port", "add", "--network", "net1", "--instance", UUID1, "--mac", "fa:16:3e:0:0:1"],
            "port.mac",
            id="malformed-mac",
        ),
        pytest.param(
            ["port", "add", "--network", "net1", "--instance", "not-a-uuid"],
            "port.instance_id",
            id="malformed-device",
        ),
        pytest.param(["instance", "remove", "nope"], "uuid", id="remove-malformed-uuid"),
        pytest.param(
            ["port", "remove", "port1", "no-such-port"], "port_id", id="remove-unknown-port"
        ),
        pytest.param(["network", "remove", "net1"], "network_id", id="network-in-use"),
        pytest.param(["router", "attach", "r9", "net1"], "router_id", id="attach-unknown-router"),
        pytest.param(["router", "add", "--network", "nope"], "router.networks[0]", id="router-net"),
        pytest.param(["network", "add", "--id", "net1"], "network.id", id="duplicate-network"),
        pytest.param(
            ["network", "add", "--subnet", "169.254.10.0/24,10.0.0.1"],
            "network.subnets[0].gateway",
            id="gateway",
        ),
    ],
)
def test_refusals_name_the_field_and_change_nothing(
    admin: Admin, argv: list[str], field: str
) -> None:
    before = admin.export()
    code, _, err = admin(*argv)
    assert code == 1
    assert f"metaproxy: error: {field}: " in err
    assert admin.export() == before


def test_user_data_over_64k_is_refused(admin: Admin, short_tmp: Path) -> None:
    big = short_tmp / "user-data"
    big.write_bytes(b"#!/bin/sh\n" + b"x" * 64 * 1024)
    before = admin.export()
    code, _, err = admin(
        "instance", "add", "--project", "p1", "--name", "big", "--user-data", str(big)
    )
    assert code == 2 and "user_data" in err and "larger than 65536 bytes" in err
    assert admin.export() == before


def test_import_unknown_key_and_bad_port_write_nothing(admin: Admin, short_tmp: Path) -> None:
    before = admin.export()
    doc = short_tmp / "inv.yaml"
    doc.write_text("networks:\n  - id: net2\ninstances:\n  - uuid: x\n    project: p1\n")
    code, _, err = admin("import", str(doc))
    assert code == 1 and "error: instances[0].project: unknown key" in err
    doc.write_text(
        yaml.safe_dump(
            {
                "networks": [{"id": "net2"}],
                "ports": [
                    {"id": "p2", "network_id": "net2", "mac": "fa:16:3e:00:00:02",
                     "instance_id": UUID1, "fixed_ips": ["169.254.10.9"]},
                    {"id": "p3", "network_id": "net1", "mac": "fa:16:3e:00:00:03",
                     "instance_id": UUID1, "fixed_ips": ["169.254.10.5"]},
                ],
            }
        )
    )  # fmt: skip
    code, _, err = admin("import", str(doc))
    assert code == 1 and "error: ports[1].fixed_ips[0]: 169.254.10.5 is already used" in err
    doc.write_text("networks: [\n")
    code, _, err = admin("import", str(doc))
    assert code == 1 and "not valid JSON or YAML" in err
    assert admin.export() == before


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_export_import_round_trip(admin: Admin, short_tmp: Path, fmt: str) -> None:
    admin.ok("router", "add", "--id", "r1", "--network", "net1")
    (short_tmp / "ud").write_bytes(b"#cloud-config\nruncmd:\n  - [echo, 'a: b']  \n\xff\x00")
    (short_tmp / "ud2").write_text("#cloud-config\npackages: [nginx]\n")
    for name in ("ud", "ud2"):
        admin.ok("instance", "add", "--project", "p1", "--name", name, "--user-data",
                 str(short_tmp / name))  # fmt: skip
    before = admin.export()
    dump = short_tmp / f"dump.{fmt}"
    dump.write_text(admin.ok("export", "--format", fmt))
    other = Admin(short_tmp / "other.db", admin.capsys)
    if fmt == "yaml":  # readable: text user data as a block, binary as base64
        assert "user_data: |\n    #cloud-config\n    packages: [nginx]\n" in dump.read_text()
        assert "user_data_base64: " in dump.read_text()
    assert "imported 1 networks, 1 routers, 3 instances, 1 ports" in other.ok("import", str(dump))
    assert other.export() == before
    # --replace swaps the whole content: importing the same document again is not a conflict.
    other.ok("import", "--replace", str(dump))
    assert other.export() == before
    assert other("import", str(dump))[0] == 1


def test_list_tables_and_json(admin: Admin) -> None:
    admin.ok("router", "add", "--id", "r1", "--network", "net1")
    out = admin.ok("instance", "list")
    header, row = out.splitlines()
    assert header.split() == ["UUID", "NAME", "PROJECT", "AZ", "ADDRESSES"]
    assert row.split() == [UUID1, "vm1", "p1", "nova", "169.254.10.5"]
    assert header.index("NAME") == row.index("vm1")  # aligned columns
    assert json.loads(admin.ok("instance", "list", "--json"))[0]["addresses"] == ["169.254.10.5"]
    assert json.loads(admin.ok("port", "list", "--json", "--network", "net1"))[0]["id"] == "port1"
    assert json.loads(admin.ok("port", "list", "--json", "--network", "nope")) == []
    assert "net1" in admin.ok("network", "list").splitlines()[1]
    assert json.loads(admin.ok("router", "list", "--json"))[0]["networks"] == ["net1"]
    admin.ok("router", "detach", "r1", "net1")
    assert json.loads(admin.ok("router", "list", "--json"))[0]["networks"] == []


def test_show_never_prints_the_password(admin: Admin, short_tmp: Path) -> None:
    doc = short_tmp / "i.json"
    uid = "33333333-3333-4333-8333-333333333333"
    instance = {"uuid": uid, "project_id": "p1", "name": "pw", "password": "hunter2-secret"}
    doc.write_text(json.dumps({"instances": [instance]}))
    admin.ok("import", str(doc))
    shown = admin.ok("instance", "show", uid)
    assert "hunter2-secret" not in shown and json.loads(shown)["password_set"] is True
    assert "hunter2-secret" not in admin.ok("instance", "list", "--json")


def test_instance_add_with_files(admin: Admin, short_tmp: Path) -> None:
    (short_tmp / "ud").write_bytes(b"#cloud-config\n")
    (short_tmp / "key.pub").write_text("ssh-ed25519 AAAAC3 me@host\n")
    (short_tmp / "vd.json").write_text('{"a": 1}')
    uid = admin.ok(
        "instance", "add", "--project", "p1", "--name", "Web 1", "--user-data",
        str(short_tmp / "ud"), "--public-key", f"me=@{short_tmp / 'key.pub'}",
        "--meta", "role=web", "--vendor-data", str(short_tmp / "vd.json"),
    ).strip()  # fmt: skip
    shown = json.loads(admin.ok("instance", "show", uid))
    assert shown["hostname"] == "web-1"
    assert shown["user_data"] == "#cloud-config\n"
    assert shown["public_keys"] == [{"name": "me", "data": "ssh-ed25519 AAAAC3 me@host"}]
    assert shown["meta"] == {"role": "web"} and shown["vendor_data"] == {"a": 1}
    admin.ok("instance", "remove", "--with-ports", uid, UUID1)
    assert admin.export()["instances"] == [] and admin.export()["ports"] == []


def test_store_found_by_config_and_state_path(short_tmp: Path) -> None:
    """--config FILE's [store] path, else --state_path DIR/metaproxy.db (run as a real process)."""
    config = short_tmp / "m.toml"
    config.write_text(f'[store]\npath = "{short_tmp / "via-config.db"}"\n')
    result = runner.run("network", "add", "--id", "n1", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (short_tmp / "via-config.db").exists()
    result = runner.run("network", "list", "--state_path", str(short_tmp / "state"))
    assert result.returncode == 0, result.stderr
    assert (short_tmp / "state" / "metaproxy.db").exists() and "n1" not in result.stdout
    config.write_text("[store]\npaht = 1\n")
    result = runner.run("network", "list", "--config", str(config))
    assert result.returncode == 2 and "[store] paht: unknown key" in result.stderr


def test_output_cut_short_by_a_pipe(short_tmp: Path) -> None:
    """`metaproxy export | head -1`: no traceback when the reader goes away."""
    store = short_tmp / "m.db"
    doc = {"networks": [{"id": f"net{n}", "name": "x" * 200} for n in range(50)]}
    (short_tmp / "big.json").write_text(json.dumps(doc))
    assert runner.run("import", str(short_tmp / "big.json"), "--store", str(store)).returncode == 0
    proc = runner.popen("export", "--store", str(store))
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader leaves before the first byte
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err
