"""`ns-proxy --engine builtin --workers N` in real namespaces: steering, caps, restarts.

Two instance addresses on one veth (169.254.10.2 and .3, link-local) reach a front listening in
the network namespace; the steering program must send each source to the worker it predicts.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaproxy.front import netns as front_netns
from metaproxy.front import steering
from support import netns
from support.engines import Front, running_front
from support.recorder import Recorder

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

SOURCES = ("169.254.10.2", "169.254.10.3")
REQUEST = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"


@pytest.fixture
def pair(ns_pair: netns.Pair) -> netns.Pair:
    """The namespace pair, with a second instance address on the instance side."""
    netns.ip("-n", ns_pair.inst_ns, "addr", "add", f"{SOURCES[1]}/16", "dev", ns_pair.inst_if)
    return ns_pair


@pytest.fixture
def front(pair: netns.Pair, short_tmp: Path, recorder: Recorder) -> Iterator[Front]:
    """A detached 2-worker front in `pair`'s network namespace, running as nobody."""
    nobody = pwd.getpwnam("nobody")
    short_tmp.chmod(0o711)  # the unprivileged workers must reach the agent socket
    extra = ("--workers", "2", "--metadata_proxy_user", "nobody")
    extra += ("--metadata_proxy_group", str(nobody.pw_gid))
    with running_front(
        "builtin",
        short_tmp / "state",
        recorder.path,
        host=netns.METADATA_IP,
        netns=pair.net_ns,
        extra=extra,
    ) as f:
        parent = f.pid
        yield f
        group = [parent, *_children(parent)]  # workers may have been replaced meanwhile
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in group) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in group), "workers outlived --destroy"


def _alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return sorted(int(p) for p in text.split())


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def _get(pair: netns.Pair, source: str) -> bytes:
    with netns.connect_from(pair.inst_ns, source, netns.METADATA_IP, 80) as sock:
        sock.sendall(REQUEST)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _serving_pids(pair: netns.Pair) -> dict[str, set[int]]:
    """Established connections to port 80 in the network namespace: peer address → pids."""
    out = netns.in_ns(pair.net_ns, "ss", "-Htnp", "state", "established", "( sport = :80 )")
    seen: dict[str, set[int]] = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        peer = fields[3].rsplit(":", 1)[0]
        seen.setdefault(peer, set()).update(int(p) for p in re.findall(r"pid=(\d+)", line))
    return seen


def _wait_serving(pair: netns.Pair, sources: tuple[str, ...]) -> dict[str, set[int]]:
    """`_serving_pids` once every source's connection is held by a worker (ss shows no pid
    for a connection still waiting in the accept queue); bounded for a loaded machine."""
    deadline = time.monotonic() + 15
    while True:
        serving = _serving_pids(pair)
        if all(serving.get(s) for s in sources) or time.monotonic() > deadline:
            return serving
        time.sleep(0.1)


def test_the_program_sends_each_source_where_it_predicts(pair: netns.Pair) -> None:
    """SO_ATTACH_REUSEPORT_CBPF with SKF_NET_OFF loads, here, on this kernel: prove it."""
    workers = 2
    assert {steering.pick(s, 0, workers) for s in SOURCES} == {0, 1}
    spec = front_netns.ListenSpec(netns.METADATA_IP, 8080, netns=pair.net_ns)
    program = steering.program(socket.AF_INET, workers)
    sockets = front_netns.open_listeners(spec, workers, lambda s: steering.attach(s[0], program))
    try:
        for source in SOURCES * 4:
            with netns.connect_from(pair.inst_ns, source, netns.METADATA_IP, 8080) as client:
                port = client.getsockname()[1]
                ready, _, _ = select.select(sockets, [], [], 5)
                assert [sockets.index(s) for s in ready] == [steering.pick(source, port, workers)]
                conn, peer = ready[0].accept()
                conn.close()
                assert peer[0] == source
    finally:
        for sock in sockets:
            sock.close()


def test_ipv6_sources_are_steered_by_their_low_32_bits(pair: netns.Pair) -> None:
    workers = 3
    netns.ip("-n", pair.net_ns, "addr", "add", "fe80::a9fe:a9fe/64", "dev", pair.net_if, "nodad")
    sources = ("fe80::1:0:3", "fe80::4", "fe80::2")  # low 32 bits: 3, 4, 2
    for source in sources:
        netns.ip("-n", pair.inst_ns, "addr", "add", f"{source}/64", "dev", pair.inst_if, "nodad")
    assert {steering.pick(s, 0, workers) for s in sources} == {0, 1, 2}
    spec = front_netns.ListenSpec("fe80::a9fe:a9fe", 8080, netns=pair.net_ns, interface=pair.net_if)
    program = steering.program(socket.AF_INET6, workers)
    sockets = front_netns.open_listeners(spec, workers, lambda s: steering.attach(s[0], program))
    try:
        for source in sources * 2:
            with netns.connect_from(
                pair.inst_ns, f"{source}%{pair.inst_if}", f"fe80::a9fe:a9fe%{pair.inst_if}", 8080
            ) as client:
                port = client.getsockname()[1]
                ready, _, _ = select.select(sockets, [], [], 5)
                assert [sockets.index(s) for s in ready] == [steering.pick(source, port, workers)]
                ready[0].accept()[0].close()
    finally:
        for sock in sockets:
            sock.close()


def test_workers_serve_each_source_as_unprivileged_children(
    front: Front, pair: netns.Pair, recorder: Recorder
) -> None:
    children = _children(front.pid)
    assert len(children) == 2
    assert _uid(front.pid) == 0  # the parent keeps the sockets and restarts workers
    assert {_uid(c) for c in children} == {pwd.getpwnam("nobody").pw_uid}
    for source in SOURCES:
        assert _get(pair, source).startswith(b"HTTP/1.1 200 "), source
    assert [r.values("X-Forwarded-For") for r in recorder.requests] == [[s] for s in SOURCES]
    held = [netns.connect_from(pair.inst_ns, s, netns.METADATA_IP, 80) for s in SOURCES]
    try:
        serving = _wait_serving(pair, SOURCES)
        pids = [serving.get(s, set()) for s in SOURCES]
        assert all(len(p) == 1 for p in pids), serving
        assert pids[0] | pids[1] == set(children), "each worker serves one of the sources"
    finally:
        for sock in held:
            sock.close()


def test_per_source_cap_holds_across_workers(front: Front, pair: netns.Pair) -> None:
    """64 connections from one instance are all it gets, even with two workers listening."""
    held = []
    try:
        for _ in range(64):
            held.append(netns.connect_from(pair.inst_ns, SOURCES[0], netns.METADATA_IP, 80))
        with netns.connect_from(pair.inst_ns, SOURCES[0], netns.METADATA_IP, 80) as extra:
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 429 "), answer[:80]
        assert _get(pair, SOURCES[1]).startswith(b"HTTP/1.1 200 "), "another source is served"
    finally:
        for sock in held:
            sock.close()


def test_rate_limit_holds_across_workers(
    pair: netns.Pair, short_tmp: Path, recorder: Recorder
) -> None:
    """Neutron's rate limit, counted by the one worker an instance always reaches."""
    extra = ("--workers", "2", "--rate_limit_enabled", "--base_window_duration", "60")
    extra += ("--base_query_rate_limit", "3", "--burst_query_rate_limit", "100")
    with running_front(
        "builtin",
        short_tmp / "state",
        recorder.path,
        host=netns.METADATA_IP,
        netns=pair.net_ns,
        extra=extra,
    ):
        statuses = [_get(pair, SOURCES[0])[9:12] for _ in range(6)]
        other = _get(pair, SOURCES[1])[9:12]
    assert statuses == [b"200"] * 3 + [b"429"] * 3
    assert other == b"200"


def test_a_killed_worker_is_replaced_without_failing_another_source(
    front: Front, pair: netns.Pair
) -> None:
    with netns.connect_from(pair.inst_ns, SOURCES[0], netns.METADATA_IP, 80):
        [victim] = _wait_serving(pair, SOURCES[:1])[SOURCES[0]]
    assert victim in _children(front.pid)
    failures: list[str] = []
    served = 0
    stop = threading.Event()

    def steady() -> None:
        nonlocal served
        while not stop.is_set():
            try:
                answer = _get(pair, SOURCES[1])
            except OSError as exc:
                failures.append(repr(exc))
                continue
            if answer.startswith(b"HTTP/1.1 200 "):
                served += 1
            else:
                failures.append(answer[:60].decode("latin-1"))

    client = threading.Thread(target=steady, daemon=True)
    client.start()
    try:
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            children = _children(front.pid)
            if len(children) == 2 and victim not in children:
                break
            time.sleep(0.05)
        assert len(children) == 2 and victim not in children, children
        time.sleep(0.5)
    finally:
        stop.set()
        client.join(timeout=20)
    assert failures == []
    assert served > 5
    assert _get(pair, SOURCES[0]).startswith(b"HTTP/1.1 200 "), "the replacement serves"


def test_sigterm_stops_the_whole_group_and_leaves_nothing(
    pair: netns.Pair, short_tmp: Path, recorder: Recorder
) -> None:
    with contextlib.ExitStack() as stack:
        front = stack.enter_context(
            running_front(
                "builtin",
                short_tmp / "state",
                recorder.path,
                host=netns.METADATA_IP,
                netns=pair.net_ns,
                extra=("--workers", "3"),
            )
        )
        parent, children = front.pid, _children(front.pid)
        assert len(children) == 3
        os.kill(parent, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in [parent, *children]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in [parent, *children])
        assert not front.pid_file.exists()
        listening = netns.in_ns(pair.net_ns, "ss", "-Htln", "( sport = :80 )")
        assert listening.stdout.strip() == ""
