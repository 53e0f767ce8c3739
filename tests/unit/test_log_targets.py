"""log.setup's targets: stderr, and the local syslog socket (a real datagram socket here)."""

from __future__ import annotations

import io
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaproxy import log as logsetup


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def syslog_socket(short_tmp: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(short_tmp / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def test_syslog_target_sends_daemon_lines_with_secrets_masked(
    syslog_socket: tuple[socket.socket, str],
) -> None:
    sock, path = syslog_socket
    logsetup.setup("INFO", target="syslog", syslog_address=path)
    logging.getLogger("metaproxy.test").warning("agent up shared_secret=hunter2 ok")
    logging.getLogger("metaproxy.test").debug("below the level")
    line = sock.recv(4096)
    # <28> = facility daemon (3) * 8 + warning (4): journald and rsyslog file it by these.
    assert line.startswith(b"<28>metaproxy[")
    assert b"WARNING metaproxy.test: agent up shared_secret=*** ok" in line
    assert b"hunter2" not in line
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    handlers = logging.getLogger().handlers
    assert [type(h) for h in handlers] == [logging.handlers.SysLogHandler]


def test_unreachable_syslog_falls_back_to_stderr_and_says_so(short_tmp: Path) -> None:
    stream = io.StringIO()
    missing = str(short_tmp / "no-such-log")
    logsetup.setup("INFO", stream=stream, target="syslog", syslog_address=missing)
    logging.getLogger("metaproxy.test").info("still heard")
    text = stream.getvalue()
    assert f"syslog socket {missing}" in text
    assert "logging to stderr" in text
    assert "still heard" in text


def test_stderr_target_is_the_default() -> None:
    stream = io.StringIO()
    logsetup.setup("INFO", stream=stream)
    logging.getLogger("metaproxy.test").info("x-instance-id-signature: abc")
    assert "x-instance-id-signature: ***" in stream.getvalue()
