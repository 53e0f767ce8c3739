"""The engine's outbox: writes of one loop round go out together, in order, before a close."""

from __future__ import annotations

import asyncio

import pytest

from metaproxy.http.outbox import Outbox


class Transport(asyncio.WriteTransport):
    def __init__(self, name: str, log: list[tuple[str, bytes]]) -> None:
        super().__init__()
        self.name = name
        self.log = log
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing
        self.log.append((self.name, bytes(data)))

    def is_closing(self) -> bool:
        return self.closing


async def test_first_write_is_at_once_the_rest_at_the_end_of_the_round() -> None:
    log: list[tuple[str, bytes]] = []
    a, b = Transport("a", log), Transport("b", log)
    outbox = Outbox()
    outbox.write(a, b"1")
    assert log == [("a", b"1")]
    outbox.write(b, b"2")
    outbox.write(a, b"3")
    assert log == [("a", b"1")]
    await asyncio.sleep(0)
    assert log == [("a", b"1"), ("b", b"2"), ("a", b"3")]
    # A new round starts over: its first write goes out at once again.
    outbox.write(b, b"4")
    assert log[-1] == ("b", b"4")
    await asyncio.sleep(0)


async def test_flush_sends_in_order_and_drops_writes_to_closed_transports() -> None:
    log: list[tuple[str, bytes]] = []
    a, b = Transport("a", log), Transport("b", log)
    outbox = Outbox()
    outbox.write(a, b"1")
    outbox.write(b, b"2")
    outbox.write(a, b"3")
    b.closing = True
    outbox.flush()
    assert log == [("a", b"1"), ("a", b"3")]
    outbox.write(a, b"4")  # after a flush, at once
    assert log[-1] == ("a", b"4")
    await asyncio.sleep(0)
    assert log == [("a", b"1"), ("a", b"3"), ("a", b"4")]


async def test_one_callback_per_round_not_per_write(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    calls = 0
    call_soon = loop.call_soon

    def counting(*args: object, **kwargs: object) -> asyncio.Handle:
        nonlocal calls
        calls += 1
        return call_soon(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_soon", counting)
    log: list[tuple[str, bytes]] = []
    outbox = Outbox()
    for i in range(50):
        outbox.write(Transport(str(i), log), b"x")
    assert calls == 1
    monkeypatch.undo()
    await asyncio.sleep(0)
    assert len(log) == 50
