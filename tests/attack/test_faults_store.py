"""Faults under the store and the private files: a locked database, a full disk.

The contract: a clear error (a StoreError / FileError naming the file, never a raw sqlite3 or
OSError traceback), no corrupted database (`PRAGMA integrity_check`), nothing half-written, and
service resumes once the fault is gone. The full disk is a real tmpfs of a few KiB, always
unmounted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from attack import tally
from metaproxy.errors import MetaproxyError, StoreError
from metaproxy.metadata import store as store_mod
from metaproxy.metadata.model import Instance, Network
from metaproxy.security import files
from support import cli

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="needs root and mount(8) for a small tmpfs (CI runs as root)",
)
CLS = "store / files faults"


@contextlib.contextmanager
def small_tmpfs(short_tmp: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at short_tmp/fs, unmounted whatever happens."""
    mnt = short_tmp / "fs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
        check=True,
        timeout=20,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=20)


def fill(mnt: Path, leave: int = 0) -> Path:
    """Fill the filesystem, leaving about `leave` bytes; returns the filler to free it later."""
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    room = st.f_bavail * st.f_frsize - leave
    with filler.open("wb") as fh:
        with contextlib.suppress(OSError):
            fh.write(b"\0" * max(room, 0))
            fh.flush()
            os.fsync(fh.fileno())
    if leave == 0:
        with contextlib.suppress(OSError), filler.open("ab") as fh:
            while True:
                fh.write(b"\0" * 512)
                fh.flush()
    return filler


def integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def instance(n: int, user_data: bytes | None = None) -> Instance:
    return Instance(
        uuid=str(uuid.UUID(int=n + 1)),
        project_id="proj-1",
        name=f"vm{n}",
        hostname=f"vm{n}",
        user_data=user_data,
    )


def _survived(name: str, ok: bool) -> None:
    tally.fault(CLS, "store", survived=ok, example=None if ok else name)


def test_disk_full_mid_write_is_a_clear_error_and_nothing_is_lost(short_tmp: Path) -> None:
    with small_tmpfs(short_tmp, "512k") as mnt:
        path = mnt / "metaproxy.db"
        store = store_mod.SqliteStore(path)
        ok = False
        try:
            store.add_network(Network(id="net-1"))
            store.add_instance(instance(1, b"#cloud-config\n"))
            filler = fill(mnt, leave=4096)
            with pytest.raises(MetaproxyError) as caught:
                for n in range(2, 40):
                    store.add_instance(instance(n, os.urandom(48 * 1024)))
            assert "metaproxy.db" in str(caught.value) or "store" in str(caught.value)
            filler.unlink()
            # Still usable, nothing half-written: the failed instance is absent, the rest intact.
            names = {i.name for i in store.instances()}
            assert "vm1" in names
            failed = [i for i in store.instances() if i.user_data and len(i.user_data) != 48 * 1024]
            assert not [i for i in failed if i.name != "vm1"]
            store.add_instance(instance(99))
            ok = True
        finally:
            store.close()
            _survived("disk full mid-write", ok)
        assert integrity(path) == "ok"


def test_disk_full_from_the_command_line_is_one_clear_line(short_tmp: Path) -> None:
    with small_tmpfs(short_tmp, "256k") as mnt:
        path = mnt / "metaproxy.db"
        assert cli.run("network", "add", "--store", str(path), "--id", "net-1").returncode == 0
        fill(mnt)
        user_data = short_tmp / "ud"
        user_data.write_bytes(b"#cloud-config\n" + b"a" * 30000)
        result = cli.run(
            "instance", "add", "--store", str(path), "--project", "p", "--name", "vm1",
            "--user_data", str(user_data),
        )  # fmt: skip
        ok = result.returncode == 1 and "Traceback" not in result.stderr
        _survived("disk full via CLI", ok)
        assert ok, result.stderr
        assert "metaproxy: error:" in result.stderr
        (mnt / "filler").unlink()
        assert integrity(path) == "ok"
        listed = cli.run("instance", "list", "--store", str(path), "--json")
        assert listed.returncode == 0 and "vm1" not in listed.stdout, listed.stderr


def test_locked_store_is_a_clear_error_then_works(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT", 0.3)
    path = short_tmp / "metaproxy.db"
    store = store_mod.SqliteStore(path)
    holder = sqlite3.connect(path, isolation_level=None)
    ok = False
    try:
        store.add_network(Network(id="net-1"))
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError) as caught:
            store_mod.SqliteStore(path).add_instance(instance(1))
        assert "busy" in str(caught.value) or "locked" in str(caught.value)
        with pytest.raises(StoreError):
            store.add_instance(instance(2))
        holder.execute("ROLLBACK")
        store.add_instance(instance(3))
        assert [i.name for i in store.instances()] == ["vm3"]
        ok = True
    finally:
        holder.close()
        store.close()
        _survived("store locked", ok)
    assert integrity(path) == "ok"


def test_concurrent_writers_under_a_lock_storm_keep_the_database_whole(short_tmp: Path) -> None:
    path = short_tmp / "metaproxy.db"
    store_mod.SqliteStore(path).close()
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        s = store_mod.SqliteStore(path)
        try:
            for n in range(15):
                s.add_instance(instance(k * 100 + n, os.urandom(2048)))
        except BaseException as exc:  # recorded, asserted below
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    s = store_mod.SqliteStore(path)
    try:
        count = len(s.instances())
    finally:
        s.close()
    ok = not errors and integrity(path) == "ok" and count == 60
    _survived("four writers at once", ok)
    assert ok, (errors, count)


def test_private_file_on_a_full_disk_is_not_half_written(short_tmp: Path) -> None:
    with small_tmpfs(short_tmp, "64k") as mnt:
        conf = mnt / "state" / "network-x.conf"
        files.ensure_private_dir(conf.parent)
        files.write_private(conf, b"old config\n")
        fill(mnt)
        ok = False
        try:
            with pytest.raises(MetaproxyError) as caught:
                files.write_private(conf, b"new config " * 20000)
            assert str(conf) in str(caught.value) or str(conf.parent) in str(caught.value)
            assert conf.read_bytes() == b"old config\n"
            assert sorted(p.name for p in conf.parent.iterdir()) == [conf.name]
            ok = True
        finally:
            _survived("config write on a full disk", ok)
