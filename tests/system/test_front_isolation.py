"""`metaproxy up` serves builtin fronts from an unprivileged worker that holds no secret.

Attacks on the isolation itself: the worker's credentials and capabilities, the shared secret
searched for in the worker's (and the zygote's) memory — and found in the manager's, which
shows the search works — orphans after the manager is SIGKILLed, and `[front] isolate = false`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import netns
from support.hoststack import Stack, leftovers, wait_for

pytestmark = [pytest.mark.netns, netns.requires_netns, pytest.mark.timeout(180)]

NOBODY = 65534


@contextlib.contextmanager
def running(
    short_tmp: Path,
    *,
    front: str = "",
    clean: bool = True,
    environ: dict[str, str] | None = None,
) -> Iterator[tuple[Stack, str]]:
    """`metaproxy up` (builtin engine) with one network; stopped and checked (`clean`) after."""
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces (CI runs as root)")
    state = short_tmp / "state"
    config = short_tmp / "metaproxy.toml"
    st = Stack(state=state, config=config, engine="builtin")
    tag = netns.suffix()
    try:
        st.pairs[tag] = netns.create_pair(tag)
        config.write_text(
            f"""
[service]
state_path = "{state}"
poll_interval = 0.3

[front]
{front}

[[network]]
id = "{tag}"
netns = "{st.pairs[tag].net_ns}"
"""
        )
        st.start(environ=environ)
        st.wait_running(tag)
        yield st, tag
        if clean:
            assert st.stop() == 0, st.stderr
            assert leftovers(st.state) == []
    finally:
        st.discard()


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[tuple[Stack, str]]:
    with running(short_tmp) as st:
        yield st


def _status_fields(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Search every readable mapping of `pid` (as root, through /proc/PID/mem)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            match = re.match(r"([0-9a-f]+)-([0-9a-f]+) (r)", line)
            if match is None or "[vvar" in line or "[vsyscall]" in line:
                continue
            start, end = int(match.group(1), 16), int(match.group(2), 16)
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


def _processes(stack: Stack) -> tuple[int, int, int]:
    """(manager, zygote, worker) pids."""
    assert stack.proc is not None
    manager = stack.proc.pid
    [zygote] = _children(manager)
    [worker] = _children(zygote)
    return manager, zygote, worker


def test_front_worker_is_unprivileged_and_serves(stack: tuple[Stack, str]) -> None:
    st, tag = stack
    _, _, worker = _processes(st)
    assert st.front(tag)["pid"] == worker
    fields = _status_fields(worker)
    assert fields["Uid"].split() == [str(NOBODY)] * 4
    assert int(fields["CapEff"], 16) == 0
    assert int(fields["CapPrm"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    # Non-dumpable: its /proc files belong to root, so even another `nobody` cannot read them.
    assert os.stat(f"/proc/{worker}/environ").st_uid == 0
    # The whole path works through the worker: the agent answers (no such instance: 404).
    code, _ = st.get(tag, "/openstack/latest/meta_data.json")
    assert code == 404


def test_the_shared_secret_is_not_in_the_workers_memory(stack: tuple[Stack, str]) -> None:
    st, tag = stack
    secret = (st.state / "shared_secret").read_text().strip().encode()
    assert len(secret) >= 32
    st.get(tag, "/openstack/latest/meta_data.json")  # the worker has relayed a request
    manager, zygote, worker = _processes(st)
    assert _memory_holds(manager, secret), "the search must find it where it is"
    assert not _memory_holds(zygote, secret)
    assert not _memory_holds(worker, secret)


def test_a_secret_from_the_environment_is_scrubbed_from_the_worker(short_tmp: Path) -> None:
    """METAPROXY_SERVICE__SHARED_SECRET is in the environment block `up` starts with; the
    zygote overwrites it (and Python's copy) before forking, so the worker has no copy."""
    secret = secrets.token_urlsafe(40)
    env = {"METAPROXY_SERVICE__SHARED_SECRET": secret}
    with running(short_tmp, environ=env) as (st, tag):
        assert st.get(tag, "/openstack/latest/meta_data.json")[0] == 404  # the agent signs
        manager, zygote, worker = _processes(st)
        needle = secret.encode()
        assert _memory_holds(manager, needle), "the search must find it where it is"
        assert not _memory_holds(zygote, needle)
        assert not _memory_holds(worker, needle)
        environ = Path(f"/proc/{worker}/environ").read_bytes()
        assert b"METAPROXY_SERVICE__SHARED_SECRET=" + b"*" * len(needle) in environ


def test_no_orphans_when_the_manager_is_killed(short_tmp: Path) -> None:
    with running(short_tmp, clean=False) as (st, _):
        manager, zygote, worker = _processes(st)
        os.kill(manager, signal.SIGKILL)
        assert st.proc is not None
        st.proc.communicate(timeout=10)

        def gone(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"
            except OSError:
                return True

        wait_for(lambda: gone(zygote) and gone(worker), 5, "the zygote and the worker to die")


def test_a_lost_zygote_takes_its_worker_and_stops_the_service(short_tmp: Path) -> None:
    """Another zygote cannot be made (a fork of the manager holds the secret), so the service
    exits 1 for systemd to restart it, and cleans up; the worker dies with the zygote even
    though its channel to the manager is still open (PDEATHSIG survives the privilege drop)."""
    with running(short_tmp, clean=False) as (st, _):
        _, zygote, worker = _processes(st)
        os.kill(zygote, signal.SIGKILL)
        assert st.proc is not None
        wait_for(lambda: not Path(f"/proc/{worker}").exists(), 5, "the worker to die")
        assert st.proc.wait(timeout=30) == 1
        st.stderr = st.proc.communicate(timeout=10)[1]
        assert "front worker zygote is gone" in st.stderr
        assert leftovers(st.state) == []


def test_isolate_false_keeps_the_fronts_in_the_service(short_tmp: Path) -> None:
    with running(short_tmp, front="isolate = false") as (st, tag):
        assert st.proc is not None
        assert st.front(tag)["pid"] == st.proc.pid
        [zygote] = _children(st.proc.pid)
        assert _children(zygote) == []
        assert st.get(tag, "/latest/meta-data/")[0] == 404


def test_configured_front_user_is_used(short_tmp: Path) -> None:
    import pwd

    try:
        user = pwd.getpwnam("daemon")
    except KeyError:
        pytest.skip("no 'daemon' user on this machine")
    with running(short_tmp, front='user = "daemon"') as (st, tag):
        _, _, worker = _processes(st)
        assert _status_fields(worker)["Uid"].split() == [str(user.pw_uid)] * 4
        assert st.get(tag, "/latest/meta-data/")[0] == 404
