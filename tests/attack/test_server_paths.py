"""Hostile paths and cross-instance attempts against the REAL metadata server, directly and
through each real front and the real agent.

Instance A (at 127.0.0.1, the test's address) asks; instance B's data carries a marker that
must never come back, nor any file from the host. Traversal gets 400/404, never a different
lookup. The IMDSv2 relay rule holds for every spelling the server routes to the token.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attack import fronts, tally
from attack.client import Exchange, exchange
from attack.corpus import CORPUS, FORGED_IP, req
from attack.strategies import NASTY_BYTES
from metaproxy.config import Secret
from metaproxy.metadata.model import Instance, Network, Port
from metaproxy.metadata.store import SqliteStore
from metaproxy.security.signing import sign_instance_id
from support import cli

pytestmark = pytest.mark.slow

SECRET = "attack-md-Secret-7"  # noqa: S105 (a test secret)
A = "aaaaaaaa-0000-4000-8000-00000000000a"
B = "bbbbbbbb-0000-4000-8000-00000000000b"
B_MARK = b"B-SECRET-MARKER"
FILE_MARKS = (b"root:x:0:0", b"[agent]", b"SQLite format")

TRAVERSALS = [
    "/openstack/../../etc/passwd",
    "/openstack/latest/../../../etc/passwd",
    "/openstack/%2e%2e/%2e%2e/etc/passwd",
    "/openstack/%2E%2E/%2E%2E/etc/passwd",
    "/openstack/..%2f..%2fetc%2fpasswd",
    "/openstack/..%252f..%252fetc%252fpasswd",
    "/openstack/%252e%252e/etc/passwd",
    "/openstack/..%5c..%5cetc%5cpasswd",
    "/openstack/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "/openstack/latest/meta_data.json%00.txt",
    "/openstack/latest/./meta_data.json",
    "/openstack/latest/user_data/..",
    "/openstack/" + B + "/meta_data.json",
    "/openstack/latest/meta_data.json/" + B,
    "/openstack/latest/meta_data.json?uuid=" + B,
    "/latest/meta-data/../../etc/passwd",
    "/latest/meta-data/%2e%2e/%2e%2e/etc/passwd",
    "/latest/meta-data/instance-id/..%2f..%2f..%2fetc/passwd",
    "/latest/user-data/../../" + B,
    "/2009-04-04/user-data/%2e%2e",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/..;/..;/etc/passwd",
    "/openstack/latest/vendor_data.json/../../../proc/self/environ",
    "/latest/dynamic/instance-identity/../../../../proc/self/cmdline",
]
TOKEN_SPELLINGS = [
    "/latest/api/token",
    "/latest/api/token/",
    "//latest/api/token",
    "/latest//api/token",
    "/latest/api/token?x=1",
    "/latest/api/%74oken",
    "/latest%2fapi%2ftoken",
    "/%6c%61%74%65%73%74/api/token",
]


@dataclass
class Stack:
    server_socket: Path
    agent_socket: Path
    procs: list[subprocess.Popen[str]]
    logs: list[Path]


def _wait(path: Path, proc: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.is_socket():
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(attack_tmp: Path) -> Iterator[Stack]:
    state = attack_tmp / "md"
    state.mkdir()
    db_path = state / "metaproxy.db"
    db = SqliteStore(db_path)
    try:
        db.add_network(Network(fronts.NETWORK_ID))
        db.add_instance(
            Instance(
                A, "proj-a", "vm-a", "vm-a", user_data=b"#cloud-config\n# A\n", meta={"who": "a"}
            )
        )
        db.add_instance(
            Instance(B, "proj-b", "vm-b", "vm-b", user_data=B_MARK, meta={"who": B_MARK.decode()})
        )
        db.add_port(Port("port-a", fronts.NETWORK_ID, "fa:16:3e:00:00:0a", A, ("127.0.0.1",)))
        db.add_port(Port("port-b", fronts.NETWORK_ID, "fa:16:3e:00:00:0b", B, ("169.254.20.2",)))
    finally:
        db.close()
    secret = state / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    server_sock, agent_sock = state / "md.sock", state / "agent.sock"
    procs, logs = [], []
    try:
        for name, argv, sock in (
            (
                "server",
                ["metadata-server", "--listen", f"unix:{server_sock}",
                 "--shared_secret_file", str(secret), "--store", str(db_path), "--tokens",
                 "optional"],
                server_sock,
            ),
            (
                "agent",
                ["agent", "--shared-secret-file", str(secret), "--store", str(db_path),
                 "--metadata_proxy_socket", str(agent_sock), "--metadata-url",
                 f"unix:{server_sock}"],
                agent_sock,
            ),
        ):  # fmt: skip
            log = state / f"{name}.log"
            with log.open("w") as fh:
                procs.append(cli.popen(*argv, stdout=fh, stderr=subprocess.STDOUT))
            logs.append(log)
            _wait(sock, procs[-1], log)
        agent_sock.chmod(0o666)
        yield Stack(server_sock, agent_sock, procs, logs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="module", params=fronts.engine_params())
def md_front(
    request: pytest.FixtureRequest, stack: Stack, attack_tmp: Path
) -> Iterator[fronts.Front]:
    engine: str = request.param
    with fronts.running_front(
        engine,
        stack.agent_socket,
        attack_tmp / f"md-{engine}",
        timeouts={"server": 10, "http_request": 3, "http_keep_alive": 3},
    ) as running:
        yield running


def signed(target: str, *extra: bytes, method: bytes = b"GET") -> bytes:
    sig = sign_instance_id(Secret(SECRET), A)
    return req(
        target,
        b"X-Instance-ID: " + A.encode(),
        b"X-Tenant-ID: proj-a",
        b"X-Instance-ID-Signature: " + sig.encode(),
        b"X-Forwarded-For: 127.0.0.1",
        *extra,
        method=method,
    )


def at_server(stack: Stack, raw: bytes, timeout: float = 10.0) -> Exchange:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(stack.server_socket))
        return exchange(("", 0), raw, sock=s, timeout=timeout)


def leaked(ex: Exchange) -> list[str]:
    found = []
    for resp in ex.responses:
        if B_MARK in resp.body or B.encode() in resp.body:
            found.append("instance B's data")
        found += [f"file content {m!r}" for m in FILE_MARKS if m in resp.body]
    if ex.garbage and B_MARK in ex.garbage:
        found.append("instance B's data (garbage)")
    return found


def test_server_answers_a_for_a(stack: Stack) -> None:
    ex = at_server(stack, signed("/openstack/latest/meta_data.json"))
    assert ex.statuses == [200], ex.garbage[:200]
    assert A.encode() in ex.responses[0].body and not leaked(ex)


@pytest.mark.parametrize("target", TRAVERSALS)
def test_traversal_at_the_server(stack: Stack, target: str) -> None:
    ex = at_server(stack, signed(target))
    problems = leaked(ex)
    dots = ".." in target or "%2e" in target.lower() or "%c0" in target or "%5c" in target
    if dots and ex.statuses and ex.statuses[0] not in (400, 404):
        problems.append(f"traversal answered {ex.statuses[0]}")
    tally.record(
        "traversal / cross-instance",
        "metadata server",
        through=int(bool(problems)),
        example=f"{target}: {problems}" if problems else None,
    )
    assert not problems, (target, ex.statuses, problems)


@pytest.mark.parametrize("target", TRAVERSALS)
def test_traversal_through_the_front(md_front: fronts.Front, target: str) -> None:
    ex = exchange(md_front.addr, req(target), timeout=10)
    problems = leaked(ex)
    if not ex.statuses or (ex.statuses[0] == 200 and ".." in target):
        problems.append(f"answered {ex.statuses} for a traversal")
    tally.record(
        "traversal / cross-instance",
        f"{md_front.engine} front + agent + server",
        through=int(bool(problems)),
        example=f"{target}: {problems}" if problems else None,
    )
    assert not problems, (target, ex.statuses, problems)


def test_forgery_corpus_end_to_end_never_reaches_b(md_front: fronts.Front) -> None:
    """Every identity forgery and framing case through front, agent and server: never B."""
    bad = []
    cases = [c for c in CORPUS if c.cls in ("forgery", "framing")]
    for case in cases:
        ex = exchange(
            md_front.addr, case.raw, expect=case.responses, timeout=1.0 if case.incomplete else 5.0
        )
        if leaked(ex):
            bad.append(case.name)
    tally.record(
        "traversal / cross-instance",
        f"{md_front.engine} front + agent + server",
        tried=len(cases),
        through=len(bad),
        example=", ".join(bad[:5]) or None,
    )
    assert not bad


@pytest.mark.parametrize("target", TOKEN_SPELLINGS)
def test_token_relay_rule_end_to_end(md_front: fronts.Front, target: str) -> None:
    ttl = b"X-aws-ec2-metadata-token-ttl-seconds: 60"
    relayed = exchange(
        md_front.addr,
        req(target, ttl, b"X-Forwarded-For: " + FORGED_IP.encode(), method=b"PUT"),
        timeout=10,
    )
    issued = bool(relayed.statuses) and relayed.statuses[0] == 200
    tally.record(
        "IMDSv2 relay rule",
        f"{md_front.engine} front + agent + server",
        through=int(issued),
        example=f"PUT {target} with X-Forwarded-For got a token" if issued else None,
    )
    assert not issued, (target, relayed.statuses)
    clean = exchange(md_front.addr, req(target, ttl, method=b"PUT"), timeout=10)
    if target == "/latest/api/token":
        assert clean.statuses == [200], clean.statuses  # the rule is not a blanket refusal


@st.composite
def _signed_mutations(draw: st.DrawFn) -> bytes:
    """A correctly signed request for A with a hostile target, then byte-level mutations."""
    target = draw(
        st.sampled_from(TRAVERSALS + TOKEN_SPELLINGS)
        | st.binary(max_size=60).map(lambda b: "/" + b.decode("latin-1"))
    )
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT"]))
    data = bytearray(signed(target, method=method))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["insert", "delete", "dup"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(NASTY_BYTES) | st.binary(min_size=1, max_size=3))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 30))]
    return bytes(data)


def test_fuzz_the_server_shell(stack: Stack) -> None:
    """Signed-but-hostile requests at the server's own HTTP shell: no 5xx, no leak, no crash."""
    tried = [0]

    @settings(
        max_examples=int(os.environ.get("METAPROXY_ATTACK_SERVER_EXAMPLES", "200")),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(_signed_mutations())
    def prop(raw: bytes) -> None:
        tried[0] += 1
        ex = at_server(stack, raw, timeout=0.3)
        problems = leaked(ex) + [f"status {s}" for s in ex.statuses if s >= 500]
        assert not problems, (raw[:200], ex.statuses, problems)

    try:
        prop()
    except AssertionError as exc:
        tally.record(
            "fuzz: metadata server",
            "metadata server",
            tried=tried[0],
            through=1,
            example=str(exc)[:300],
        )
        raise
    tally.record("fuzz: metadata server", "metadata server", tried=tried[0])
    assert all(p.poll() is None for p in stack.procs), stack.logs[0].read_text()[-2000:]
    assert at_server(stack, signed("/openstack/latest/meta_data.json")).statuses == [200]
