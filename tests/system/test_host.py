"""`metaproxy up` over real namespaces: front → agent → embedded server, with both engines.

Two tenant networks whose instances have the SAME address (169.254.10.2), each behind its own
front; one declared in the config file, the other only in the store. Every test ends with a
SIGTERM and checks that nothing is left: no process, socket, pidfile or haproxy config.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaproxy.metadata import model
from metaproxy.metadata.store import open_store
from support import cli, guest, netns
from support.hoststack import Stack, leftovers, wait_for

HAVE_HAPROXY = any(Path(p).exists() for p in ("/usr/sbin/haproxy", "/usr/bin/haproxy"))
SAME_IP = "169.254.10.2"

pytestmark = [pytest.mark.netns, netns.requires_netns]

HAPROXY = pytest.param(
    "haproxy",
    id="haproxy",
    marks=[
        pytest.mark.haproxy,
        pytest.mark.skipif(not HAVE_HAPROXY, reason="haproxy is not installed"),
    ],
)
ENGINES = [pytest.param("builtin", id="builtin"), HAPROXY]


def _add_tenant(store_path: Path, network_id: str, ip: str, mac: str) -> str:
    instance_id = str(uuid.uuid4())
    store = open_store(store_path)
    try:
        store.add_network(model.network_from_mapping({"id": network_id}))
        store.add_instance(
            model.instance_from_mapping(
                {
                    "uuid": instance_id,
                    "project_id": f"proj-{network_id}",
                    "name": f"vm-{network_id}",
                    "user_data": f"#cloud-config\n# for {network_id}\n",
                    "public_keys": [{"name": "k0", "data": f"ssh-ed25519 AAAAkey{network_id} t"}],
                }
            )
        )
        store.add_port(
            model.port_from_mapping(
                {
                    "id": f"port-{network_id}",
                    "network_id": network_id,
                    "mac": mac,
                    "instance_id": instance_id,
                    "fixed_ips": [ip],
                }
            )
        )
    finally:
        store.close()
    return instance_id


def _pair(stack: Stack) -> tuple[str, netns.Pair]:
    tag = netns.suffix()
    pair = netns.create_pair(tag, inst_ip=SAME_IP)
    stack.pairs[tag] = pair
    return tag, pair


@pytest.fixture(params=ENGINES)
def stack(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Stack]:
    engine: str = request.param
    state = short_tmp / "state"
    config = short_tmp / "metaproxy.toml"
    st = Stack(state=state, config=config, engine=engine)
    try:
        declared, _ = _pair(st)
        stored, _ = _pair(st)
        state.mkdir(mode=0o700)
        for i, network_id in enumerate((declared, stored)):
            st.instances[network_id] = _add_tenant(
                state / "metaproxy.db", network_id, SAME_IP, f"fa:16:3e:00:00:0{i + 1}"
            )
        config.write_text(
            f"""
[service]
state_path = "{state}"
engine = "{engine}"
metrics = "unix:{state}/metrics.sock"
poll_interval = 0.3
stop_timeout = 5

[front]
network_netns = "mp-net-{{id}}"

[[network]]
id = "{declared}"
netns = "{st.pairs[declared].net_ns}"
"""
        )
        st.start()
        st.wait_running(declared, stored)
        yield st
        assert st.stop() == 0, st.stderr
        assert leftovers(state) == []
        assert "Traceback" not in st.stderr, st.stderr
    finally:
        st.discard()


def test_same_ip_on_two_networks_gets_each_its_own_instance(stack: Stack) -> None:
    for network_id, instance_id in stack.instances.items():
        code, body = stack.get(network_id, "/openstack/latest/meta_data.json")
        assert code == 200, body
        meta = json.loads(body)
        assert meta["uuid"] == instance_id
        assert meta["project_id"] == f"proj-{network_id}"
        assert stack.get(network_id, "/latest/meta-data/instance-id") == (200, instance_id)
        code, user_data = stack.get(network_id, "/openstack/latest/user_data")
        assert (code, user_data) == (200, f"#cloud-config\n# for {network_id}\n")


def test_status_and_metrics(stack: Stack) -> None:
    network_id = next(iter(stack.instances))
    for _ in range(3):
        assert stack.serves(network_id)
    assert stack.get(network_id, "/no/such/path")[0] == 404
    text = cli.run("status", "--config", str(stack.config))
    assert text.returncode == 0, text.stderr
    header = text.stdout.splitlines()[2].split()
    assert header[:5] == ["FRONT", "NAMESPACE", "ENGINE", "PID", "STATE"]
    # An isolated front worker pushes its counters every STATS_INTERVAL (0.5 s): under load the
    # latest push may not have arrived yet, so wait for it (bounded).
    deadline = time.monotonic() + 10
    row = stack.front(network_id)
    while row["requests"] < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
        row = stack.front(network_id)
    assert row["state"] == "running" and row["engine"] == stack.engine
    assert row["requests"] >= 4 and isinstance(row["pid"], int)
    status = stack.status()
    assert status["agent"]["state"] == "running" and status["server"]["state"] == "running"
    for private in ("shared_secret", "control.sock", "metrics.sock", "metaproxy.db"):
        assert (stack.state / private).stat().st_mode & 0o077 == 0, private
    assert status["agent"]["lookups"] >= 1

    metrics = _scrape(stack.state / "metrics.sock")
    assert f'metaproxy_front_up{{network="network-{network_id}",engine="{stack.engine}"' in metrics
    assert f'metaproxy_requests_total{{network="network-{network_id}"' in metrics
    assert "metaproxy_agent_lookups_total" in metrics
    assert "metaproxy_agent_cache_hits_total" in metrics
    assert "# TYPE metaproxy_respawns_total counter" in metrics
    assert f'metaproxy_upstream_latency_seconds_count{{network="{network_id}"}} ' in metrics


def _scrape(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def test_network_added_while_running_is_served(stack: Stack) -> None:
    tag, _ = _pair(stack)
    # Through the admin CLI, as an operator would, while the service runs.
    state = ["--state-path", str(stack.state)]
    assert cli.run("network", "add", "--id", tag, *state).returncode == 0
    instance = str(uuid.uuid4())
    added = cli.run(
        "instance", "add", "--uuid", instance, "--project-id", "p3", "--name", "vm3", *state
    )
    assert added.returncode == 0, added.stderr
    port = cli.run(
        "port", "add", "--network-id", tag, "--instance-id", instance, "--ip", SAME_IP, *state
    )
    assert port.returncode == 0, port.stderr
    stack.wait_running(tag, timeout=20)
    assert stack.get(tag, "/latest/meta-data/instance-id") == (200, instance)


def test_sighup_rereads_the_config(stack: Stack) -> None:
    tag, pair = _pair(stack)
    network_id = f"hup-{tag}"  # its template namespace (mp-net-hup-...) does not exist
    instance = _add_tenant(stack.state / "metaproxy.db", network_id, SAME_IP, "fa:16:3e:00:00:09")
    stack.instances[network_id] = instance
    stack.pairs[network_id] = stack.pairs.pop(tag)
    wait_for(lambda: stack.front(network_id)["state"] == "netns-gone", 15, "the store's front")
    with stack.config.open("a") as fh:
        fh.write(f'\n[[network]]\nid = "{network_id}"\nnetns = "{pair.net_ns}"\n')
    assert stack.proc is not None
    stack.proc.send_signal(signal.SIGHUP)
    stack.wait_running(network_id, timeout=20)
    assert stack.get(network_id, "/latest/meta-data/instance-id") == (200, instance)


def test_deleted_namespace_is_reported_and_the_others_keep_serving(stack: Stack) -> None:
    gone, kept = list(stack.instances)
    netns.ip("netns", "del", stack.pairs[gone].net_ns)
    wait_for(lambda: stack.front(gone)["state"] == "netns-gone", 15, "the front to be reported")
    assert "was deleted" in stack.front(gone)["last_error"]
    assert stack.serves(kept)
    assert stack.front(kept)["state"] == "running"


def test_recreated_namespace_is_served_again(stack: Stack) -> None:
    """A broken listener: its namespace replaced under it; the front follows within seconds."""
    network_id = next(iter(stack.instances))
    old = stack.pairs[network_id]
    netns.delete_pair(old)
    stack.pairs[network_id] = netns.create_pair(network_id, inst_ip=SAME_IP)
    wait_for(lambda: stack.serves(network_id), 15, "the front to serve the new namespace")


def test_killed_front_process_is_respawned(stack: Stack) -> None:
    """haproxy, or the builtin engine's front worker (service/frontworkers.py)."""
    network_id = next(iter(stack.instances))
    pid = stack.front(network_id)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: stack.front(network_id)["pid"] not in (None, pid) and stack.serves(network_id),
        5,
        "the front process to be respawned and serve",
    )
    assert stack.front(network_id)["respawns"] == 1


@pytest.mark.cloudinit
@pytest.mark.skipif(
    not Path("/usr/lib/python3/dist-packages/cloudinit").is_dir()
    or shutil.which("python3", path="/usr/bin") is None,
    reason="Debian's cloud-init package (and /usr/bin/python3) is not installed",
)
def test_cloud_init_readers_read_their_instance(stack: Stack) -> None:
    """Debian's cloud-init readers, inside each instance namespace, read their own instance."""
    for i, (network_id, instance_id) in enumerate(stack.instances.items()):
        mac = f"fa:16:3e:00:00:0{i + 1}"
        result = netns.in_ns(
            stack.pairs[network_id].inst_ns,
            "/usr/bin/python3",
            "-c",
            guest.READER_SCRIPT,
            f"http://{netns.METADATA_IP}",
            mac,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        got = json.loads(result.stdout)
        assert got["uuid"] == got["instance-id"] == instance_id
        assert got["hostname"] == f"vm-{network_id}"
        assert got["userdata"] == got["ec2_userdata"] == f"#cloud-config\n# for {network_id}\n"
        assert got["public_keys"] == {"k0": f"ssh-ed25519 AAAAkey{network_id} t"}
        for ec2_md in (got["ec2"], got["os_ec2"]):
            assert ec2_md["instance-id"] == instance_id
            assert ec2_md["local-ipv4"] == SAME_IP
            assert ec2_md["mac"] == mac
        assert got["network_config"]["config"][0]["mac_address"] == mac
        assert result.stderr.count("Read from ") >= 20
        for marker in guest.FAILURE_MARKERS:
            assert marker not in result.stderr, result.stderr[-4000:]


def test_demo_from_the_command_line() -> None:
    """`metaproxy up --demo`: curl from the demo instance, SIGTERM, nothing left behind."""
    before = set(netns.ip("netns", "list").stdout.split())
    proc = cli.popen("up", "--demo", stdout=subprocess.PIPE)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        wait_for(lambda: _read_until_curl(proc, lines), 60, "the demo instructions", step=0)
        command = next(line.strip() for line in lines if "meta_data.json" in line)
        argv = command.split()
        assert argv[:4] == ["sudo", "ip", "netns", "exec"]
        result = subprocess.run(
            [*argv[1:5], "curl", "-sS", "--max-time", "5", argv[-1]],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        meta = json.loads(result.stdout)
        assert meta["name"] == "demo-instance"
        state_line = next(line for line in lines if " status --state-path" in line)
        state = Path(state_line.split()[-1])
        assert state.is_dir()
        status = cli.run("status", "--state-path", str(state))
        assert status.returncode == 0, status.stderr
        assert "running" in status.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    after = set(netns.ip("netns", "list").stdout.split())
    assert not [ns for ns in after - before if ns.startswith("mp-demo-")]
    assert not state.exists()
    assert "Traceback" not in err, err


def _read_until_curl(proc: subprocess.Popen[str], lines: list[str]) -> bool:
    assert proc.stdout is not None
    if proc.poll() is not None:
        raise AssertionError(f"metaproxy up --demo exited: {proc.communicate()[1]}")
    line = proc.stdout.readline()
    lines.append(line)
    return " status --state-path" in line


class _SlowNova(http.server.BaseHTTPRequestHandler):
    """A Nova metadata API that takes its time: requests are in flight when SIGTERM comes."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        time.sleep(1.5)
        body = f"slow answer for {self.headers.get('X-Instance-ID')}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_lets_requests_in_flight_finish(engine: str, short_tmp: Path) -> None:
    nova = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowNova)
    threading.Thread(target=nova.serve_forever, daemon=True).start()
    state = short_tmp / "state"
    st = Stack(state=state, config=short_tmp / "m.toml", engine=engine)
    try:
        tag, _ = _pair(st)
        state.mkdir(mode=0o700)
        instance = _add_tenant(state / "metaproxy.db", tag, SAME_IP, "fa:16:3e:00:00:07")
        st.config.write_text(
            f'[service]\nstate_path = "{state}"\nengine = "{engine}"\ndrain_timeout = 5\n'
            f'metadata_url = "http://127.0.0.1:{nova.server_address[1]}"\n'
            'shared_secret = "nova-shared-secret"\n'
            '[front]\nnetwork_netns = "mp-net-{id}"\n'
        )
        st.start()
        st.wait_running(tag)
        curl = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                st.pairs[tag].inst_ns,
                "curl",
                "-sS",
                "--max-time",
                "20",
                f"http://{netns.METADATA_IP}/latest/meta-data/instance-id",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.7)  # the request is now waiting on the slow server
        assert st.stop() == 0, st.stderr
        out, err = curl.communicate(timeout=30)
        assert curl.returncode == 0, err
        assert out == f"slow answer for {instance}"
        assert leftovers(state) == []
    finally:
        nova.shutdown()
        nova.server_close()
        st.discard()
