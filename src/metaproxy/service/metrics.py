"""Prometheus text exposition (format 0.0.4) and the small HTTP endpoint that serves it.

Off by default. When on, it listens on a host address or a Unix socket that the manager
creates in the host's own namespace — never inside a tenant namespace, where an instance could
read it. `GET /metrics` only; anything else is 404/405. No client library: the text format is
a dozen lines, and the manager already holds every number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from metaproxy.errors import ConfigError
from metaproxy.service.settings import MetricsEndpoint

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Upstream latency buckets (seconds): a metadata answer is normally a few milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class Sample:
    suffix: str
    labels: Mapping[str, str]
    value: float


@dataclass(slots=True)
class Family:
    """One metric family: name, help, type and its samples."""

    name: str
    help: str
    kind: Kind
    samples: list[Sample] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append(Sample(suffix, labels, value))


@dataclass(slots=True)
class Histogram:
    """Cumulative-bucket histogram of observations (e.g. upstream latency in seconds)."""

    buckets: Sequence[float] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def export(self, family: Family, **labels: str) -> None:
        for bound, n in zip(self.buckets, self.counts, strict=True):
            family.add(n, "_bucket", **labels, le=_number(bound))
        family.add(self.count, "_bucket", **labels, le="+Inf")
        family.add(self.total, "_sum", **labels)
        family.add(self.count, "_count", **labels)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: Iterable[Family]) -> str:
    """The text exposition: HELP and TYPE lines, then one line per sample."""
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {fam.help.replace(chr(10), ' ')}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for sample in fam.samples:
            labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sample.labels.items())
            text = f"{{{labels}}}" if labels else ""
            lines.append(f"{fam.name}{sample.suffix}{text} {_number(sample.value)}")
    return "\n".join(lines) + "\n"


Collector = Callable[[], list[Family]]


class MetricsServer:
    """Serve `GET /metrics` on a host TCP address or a Unix socket (0600) until `close`."""

    def __init__(self, endpoint: MetricsEndpoint, collect: Collector) -> None:
        self.endpoint = endpoint
        self._collect = collect
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        ep = self.endpoint
        try:
            if ep.path is not None:
                from metaproxy.service.control import claim_socket_path

                claim_socket_path(ep.path)
                self._server = await asyncio.start_unix_server(self._serve, path=str(ep.path))
                os.chmod(ep.path, 0o600)
            else:
                self._server = await asyncio.start_server(self._serve, host=ep.host, port=ep.port)
        except OSError as exc:
            raise ConfigError(
                f"service.metrics: cannot listen on {ep}: {exc.strerror or exc}",
                key="service.metrics",
            ) from exc
        log.info("metrics at %s/metrics", ep)

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful when configured as port 0 in tests)."""
        if not isinstance(self._server, asyncio.Server) or self.endpoint.path is not None:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                status, body = self._answer(head.split(b"\r\n", 1)[0])
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answer(self, request_line: bytes) -> tuple[str, bytes]:
        parts = request_line.split(b" ")
        if len(parts) != 3:
            return "400 Bad Request", b"bad request\n"
        method, target, _ = parts
        if target.split(b"?", 1)[0] != b"/metrics":
            return "404 Not Found", b"not found; try /metrics\n"
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"method not allowed\n"
        try:
            text = render(self._collect())
        except Exception:
            log.exception("collecting metrics failed")
            return "500 Internal Server Error", b"collecting metrics failed\n"
        return "200 OK", (text.encode() if method == b"GET" else b"")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.endpoint.path is not None:
            from metaproxy.security import files

            files.remove(self.endpoint.path)
