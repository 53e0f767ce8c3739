"""Boot-storm load generator: many simulated instances, each replaying cloud-init's requests.

Run as its own process (`python -m bench.loadgen SPEC.json`) so that its CPU use is visible and
separate from the systems measured; a large storm is split over several such processes that
start at one shared moment (`start_at`), since one Python process opening 1,000 connections
delays its own first requests by 100 ms and more. One keep-alive connection per instance,
bound to that instance's own source address; every instance starts at the same moment.

`walk` reproduces the request sequence of cloud-init 22.4.2's OpenStack datasource (see
/work/shared/reference/guest-clients.md and cloudinit/sources/helpers/{openstack,ec2}.py):
/openstack twice, the newest known version's five files, then the EC2 meta-data walk (children
depth-first in listing order, then leaves; `0=name` under public-keys/ becomes 0/openssh-key).
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

OS_VERSIONS = (
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
)
CLOUD_INIT_UA = "Cloud-Init/22.4.2"
REQUESTS_UA = "python-requests/2.28.1"


def request_bytes(path: str, host: str, agent: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\n"
        "Accept-Encoding: gzip, deflate, br\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n"
    ).encode("ascii")


class ResponseParser:
    """Just enough HTTP/1.1 response parsing: status, Content-Length or chunked, Connection."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> tuple[int, bytes, bool] | None:
        """(status, body, server closes) of the first complete response, or None for more."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buf[:end]).lower()
        status = int(head[9:12])
        close = b"\r\nconnection: close" in head
        start = end + 4
        if b"\r\ntransfer-encoding: chunked" in head:
            body, consumed = self._chunked(start)
            if consumed < 0:
                return None
        else:
            pos = head.find(b"\r\ncontent-length:")
            length = 0
            if pos >= 0:
                stop = head.find(b"\r\n", pos + 2)
                length = int(head[pos + 17 : stop if stop >= 0 else None])
            if len(self.buf) < start + length:
                return None
            body, consumed = bytes(self.buf[start : start + length]), start + length
        del self.buf[:consumed]
        return status, body, close

    def _chunked(self, pos: int) -> tuple[bytes, int]:
        body = bytearray()
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return b"", -1
            size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                trailer_end = self.buf.find(b"\r\n\r\n", eol)
                if self.buf[eol : eol + 4] == b"\r\n\r\n":
                    return bytes(body), eol + 4
                return (bytes(body), trailer_end + 4) if trailer_end >= 0 else (b"", -1)
            if len(self.buf) < eol + 2 + size + 2:
                return b"", -1
            body += self.buf[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2


class Client(asyncio.Protocol):
    """One keep-alive connection; `request()` sends and awaits one whole response."""

    def __init__(self) -> None:
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if self.waiter is not None and not self.waiter.done():
            try:
                done = self.parser.next()
            except ValueError as exc:
                self.waiter.set_exception(exc)
                return
            if done is not None:
                self.waiter.set_result(done)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed by the server"))

    async def request(self, data: bytes, timeout: float) -> tuple[int, bytes, bool]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await asyncio.wait_for(self.waiter, timeout)


async def connect(source: str, host: str, port: int) -> Client:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    _, client = await loop.create_connection(Client, sock=sock)
    return client


@dataclass
class Instance:
    latencies: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # the sequence index of each latency
    errors: dict[str, int] = field(default_factory=dict)
    finished: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def replay(
    source: str,
    spec: dict[str, Any],
    start: asyncio.Event,
    t0: list[float],
) -> Instance:
    """One instance: every request of the sequence in order on one keep-alive connection."""
    result = Instance()
    host, port, timeout = spec["host"], spec["port"], spec["timeout"]
    wire = [(request_bytes(p, spec["host_header"], ua), want) for p, ua, want in spec["sequence"]]
    await start.wait()
    client: Client | None = None
    for step, (data, want) in enumerate(wire):
        began = time.perf_counter()
        try:
            if client is None or client.lost:
                client = await asyncio.wait_for(connect(source, host, port), timeout)
            status, _, close = await client.request(data, timeout)
        except TimeoutError:
            result.error("timeout")
            client = _drop(client)
            continue
        except (OSError, ConnectionError, ValueError) as exc:
            result.error(type(exc).__name__)
            client = _drop(client)
            continue
        result.latencies.append(time.perf_counter() - began)
        result.steps.append(step)
        if status != want:
            result.error(f"status {status}")
        if close:
            client = _drop(client)
    _drop(client)
    result.finished = time.perf_counter() - t0[0]
    return result


def _drop(client: Client | None) -> None:
    if client is not None and client.transport is not None:
        client.transport.close()


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def storm(spec: dict[str, Any]) -> dict[str, Any]:
    """Every instance of `spec["sources"]` at once: at `spec["start_at"]` (time.time(), shared
    by the generator processes of one storm) or 0.2 s from now. The raw figures, for
    `summarize` to merge with the other processes' ones."""
    sources: list[str] = spec["sources"]
    start = asyncio.Event()
    t0 = [0.0]
    tasks = [asyncio.ensure_future(replay(s, spec, start, t0)) for s in sources]
    await asyncio.sleep(0.2)  # every task parked on the start event
    if "start_at" in spec:
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    t0[0] = time.perf_counter()
    start.set()
    instances = await asyncio.wait_for(asyncio.gather(*tasks), spec["deadline"])
    errors: dict[str, int] = {}
    for inst in instances:
        for kind, count in inst.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    return {
        "latencies": [x for i in instances for x in i.latencies],
        "steps": [x for i in instances for x in i.steps],
        "finished": [i.finished for i in instances],
        "error_kinds": errors,
        "requests_per_instance": len(spec["sequence"]),
    }


def summarize(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One storm's figures from the raw output of each of its generator processes."""
    latencies = [x for p in parts for x in p["latencies"]]
    steps = [x for p in parts for x in p["steps"]]
    finished = [x for p in parts for x in p["finished"]]
    errors: dict[str, int] = {}
    for part in parts:
        for kind, count in part["error_kinds"].items():
            errors[kind] = errors.get(kind, 0) + count
    wall = max(finished, default=0.0)
    by_step: dict[int, list[float]] = {}
    for step, latency in zip(steps, latencies, strict=True):
        by_step.setdefault(step, []).append(latency)
    return {
        "instances": len(finished),
        "processes": len(parts),
        "requests_per_instance": parts[0]["requests_per_instance"] if parts else 0,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "wall_s": wall,
        "rps": len(latencies) / wall if wall else 0.0,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=0.0) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else 0.0,
        "instance_p50_s": percentile(finished, 50),
        "instance_max_s": wall,
        # The first request of each instance includes its TCP connect (the SYN storm).
        "first_p99_ms": percentile(by_step.get(0, []), 99) * 1000,
        "rest_p99_ms": percentile([x for k, v in by_step.items() if k for x in v], 99) * 1000,
    }


async def walk(spec: dict[str, Any]) -> list[list[Any]]:
    """The exact request sequence cloud-init's OpenStack datasource makes against this server."""
    client = await connect(spec["sources"][0], spec["host"], spec["port"])
    sequence: list[list[Any]] = []

    async def get(path: str, agent: str) -> tuple[int, bytes]:
        status, body, _ = await client.request(
            request_bytes(path, spec["host_header"], agent), spec["timeout"]
        )
        sequence.append([path, agent, status])
        return status, body

    await get("/openstack", CLOUD_INIT_UA)  # wait_for_metadata_service
    status, body = await get(
        "/openstack", CLOUD_INIT_UA
    )  # MetadataReader._fetch_available_versions
    listed = {line.strip() for line in body.decode().splitlines()} if status == 200 else set()
    version = next((v for v in reversed(OS_VERSIONS) if v in listed), "latest")
    for name in ("meta_data.json", "user_data", "vendor_data.json", "vendor_data2.json"):
        await get(f"/openstack/{version}/{name}", CLOUD_INIT_UA)
    await get(f"/openstack/{version}/network_data.json", CLOUD_INIT_UA)

    async def materialize(url: str) -> None:
        status, blob = await get(url, REQUESTS_UA)
        if status != 200:
            return
        leaves: dict[str, str] = {}
        children: list[str] = []
        for raw in blob.decode(errors="replace").splitlines():
            item = raw.strip()
            name = item.rstrip("/") if item.endswith("/") else item
            if not item or not name or name == "security-credentials":
                continue
            if item.endswith("/"):
                if name not in children:
                    children.append(name)
                continue
            resource = name
            ident, sep, sub = item.partition("=")
            if sep and ident.strip().lstrip("-").isdigit():
                resource, name = f"{int(ident)}/openssh-key", sub
            leaves[name] = resource
        for child in children:
            await materialize(url + quote(child, safe="/:") + "/")
        for resource in leaves.values():
            await get(url + quote(resource, safe="/:"), REQUESTS_UA)

    await materialize("/latest/meta-data/")
    _drop(client)
    return sequence


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as fh:
        spec = json.load(fh)
    try:
        import uvloop  # type: ignore[import-not-found]

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    if spec.get("mode") == "walk":
        out: Any = runner(walk(spec))
    else:
        out = runner(storm(spec))
        if not spec.get("raw"):
            out = summarize([out])
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
