"""Starting the fronts to compare: metaproxy engines (`ns-proxy --foreground`) and references."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench import proc, systems, wrk
from bench.context import Context, metaproxy_argv
from bench.procs import BenchError, Child, free_port, http_get, tcp_ready, wait_until


@dataclass
class Front:
    """A running front on 127.0.0.1:port, or the reason it could not start."""

    name: str
    label: str
    port: int = 0
    child: Child | None = None
    error: str = ""
    pids: list[int] = field(default_factory=list)
    also: list[int] = field(default_factory=list)  # more processes on the path (agent, server)

    @property
    def up(self) -> bool:
        return self.child is not None and not self.error

    def cpu_seconds(self) -> float:
        """CPU time of the front's processes (haproxy under metaproxy included) and `also`."""
        assert self.child is not None
        self.pids = proc.tree([self.child.pid, *self.also])
        return proc.cpu_seconds(self.pids)

    def problems(self, others: list[Child] | None = None) -> list[str]:
        """Warnings and errors the front (and `others` on its path) logged, for the notes."""
        out = []
        for child in [self.child, *(others or [])]:
            if child is not None:
                out += [f"{child.name}: {p}" for p in child.problems()]
        return out

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


LABELS = {
    "builtin": "metaproxy builtin",
    "builtin-2w": "metaproxy builtin, 2 workers",
    "builtin-p1": "metaproxy builtin, --pipeline 1",
    "haproxy-engine": "metaproxy haproxy engine",
    "haproxy-neutron": "haproxy, Neutron config",
    "haproxy-keepalive": "haproxy, keep-alive tuned",
}


def start_engine(
    ctx: Context,
    engine: str,
    upstream: Path,
    *,
    network_id: str,
    tag: str = "",
    workers: int = 1,
    pipeline: int | None = None,
) -> Front:
    """`metaproxy ns-proxy --engine ENGINE --foreground` on 127.0.0.1 with a free port
    (`--workers N` when workers > 1: the CPU then counts the parent and every worker)."""
    name = "builtin" if engine == "builtin" else "haproxy-engine"
    if workers > 1:
        name = f"{name}-{workers}w"
    if pipeline is not None:
        name = f"{name}-p{pipeline}"
    front = Front(name, LABELS[name])
    try:
        front.port = free_port()
        tag = tag or (engine if name in ("builtin", "haproxy-engine") else name)
        state = ctx.workdir / f"state-{tag}"
        argv = [
            *metaproxy_argv(),
            "--log-level",
            ctx.options.log_level,
            "ns-proxy",
            "--engine",
            engine,
            "--foreground",
            "--network_id",
            network_id,
            "--bind_address",
            "127.0.0.1",
            "--metadata_port",
            str(front.port),
            "--metadata_proxy_socket",
            str(upstream),
            "--state_path",
            str(state),
            "--pid_file",
            str(state / "front.pid"),
            *(["--workers", str(workers)] if workers > 1 else []),
            *(["--pipeline", str(pipeline)] if pipeline is not None else []),
        ]
        front.child = ctx.track(Child(f"front-{tag}", argv, ctx.workdir))
        wait_until(f"{engine} front", tcp_ready("127.0.0.1", front.port), 30, front.child)
    except BenchError as exc:
        front.error = str(exc).splitlines()[-1][:200]
        ctx.log(f"{name} unavailable: {exc}")
    return front


def start_reference(ctx: Context, kind: str, upstream: Path) -> Front:
    name = f"haproxy-{kind}"
    front = Front(name, LABELS[name])
    try:
        front.port = free_port()
        front.child = ctx.track(
            systems.start_haproxy_reference(kind, ctx.workdir, front.port, upstream)
        )
    except BenchError as exc:
        front.error = str(exc).splitlines()[-1][:200]
    return front


def probe(front: Front, path: str, expect: int = 200) -> None:
    """One request through the front; a front that answers wrongly is marked unavailable."""
    if not front.up:
        return
    try:
        status, body = http_get("127.0.0.1", front.port, path)
    except OSError as exc:
        front.error = f"probe failed: {exc}"
        return
    if status != expect:
        front.error = f"probe {path} answered {status}: {body[:80]!r}"


@dataclass
class Sample:
    """One wrk run against one front."""

    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float | None
    errors: int
    requests: int


def measure(front: Front, path: str, conns: int, seconds: float, script: Path, rnd: int) -> Sample:
    """wrk against `front` for `seconds`, with the CPU its processes used meanwhile."""
    cpu0 = front.cpu_seconds()
    res = wrk.run(front.url(path), connections=conns, seconds=seconds, script=script)
    cpu1 = front.cpu_seconds()
    cpu = (cpu1 - cpu0) / res.requests * 1e6 if res.requests else None
    return Sample(rnd, res.rps, res.p50_ms, res.p99_ms, cpu, res.errors, res.requests)
