"""Writes made while the loop handles one round of events, sent together at the round's end.

A write to a local socket wakes its reader (wrk, nginx, the agent); on a busy host the woken
process often takes this CPU at once, and the front is switched out in the middle of its round,
once per write (a py-spy/perf profile showed a fifth of the front's CPU in those switches). An
`Outbox` sends the first write of a round at once and queues the others, which go out back to
back after the round's callbacks (one `call_soon` per round that queued any, never one per
write): the readers are woken while they are still busy, and the front finishes its round.
With one connection nothing is ever queued, so nothing waits.

Order per transport is kept: a write goes out at once only when nothing is queued, and what a
round queued for one transport (pipelined requests to the agent) goes out as one write. Whoever
closes a transport, or must know its bytes are out, calls `flush()` first; queued bytes for a
transport that closed meanwhile are dropped, as its own buffer would be.
"""

from __future__ import annotations

import asyncio


class Outbox:
    """Queue of (transport, bytes) for the rest of this loop round (see the module doc)."""

    __slots__ = ("_pending", "_scheduled")

    def __init__(self) -> None:
        self._pending: list[tuple[asyncio.WriteTransport, bytes]] = []
        self._scheduled = False

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        pending = self._pending
        if not pending:
            transport.write(data)
            # Later writes of this round queue up behind this one.
            pending.append((transport, b""))
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._end_of_round)
            return
        pending.append((transport, data))

    def flush(self) -> None:
        """Send everything queued now, in order."""
        pending = self._pending
        if len(pending) <= 1:
            pending.clear()
            return
        self._pending = []
        joined: dict[asyncio.WriteTransport, list[bytes]] = {}
        for transport, data in pending:
            if data:
                parts = joined.get(transport)
                if parts is None:
                    joined[transport] = [data]
                else:
                    parts.append(data)
        for transport, parts in joined.items():
            if not transport.is_closing():
                transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _end_of_round(self) -> None:
        self._scheduled = False
        self.flush()
