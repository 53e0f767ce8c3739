"""Scenario 2, memory per network: one builtin process with 1..1,000 listeners in namespaces
versus one haproxy (metaproxy's haproxy engine) per network, 1..100."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import proc, systems
from bench.context import REPO, Context, metaproxy_argv, module_argv
from bench.netns import Namespaces
from bench.procs import BenchError, Child
from bench.report import Check, Column, ScenarioResult, Table, at_most, ratio

NAME = "memory"
TITLE = "2. Memory per network: builtin (one process) vs haproxy engine (one haproxy each)"

Level = tuple[int, proc.Memory]


def builtin_levels(ctx: Context, ns: Namespaces, upstream: Path, levels: list[int]) -> list[Level]:
    plan = {
        "namespaces": ns.names[: levels[-1]],
        "levels": levels,
        "upstream": str(upstream),
        "state": str(ctx.workdir / "bstate"),
    }
    plan_path = ctx.workdir / "memplan.json"
    plan_path.write_text(json.dumps(plan))
    child = ctx.track(
        Child(
            "memchild",
            [*module_argv("bench.memchild"), str(plan_path)],
            ctx.workdir,
            pipes=True,
            cwd=REPO,
        )
    )
    popen = child.proc
    assert popen.stdin is not None and popen.stdout is not None
    out: list[Level] = []
    for level in levels:
        line = child.read_line(timeout=300)
        if not line.startswith("level "):
            popen.wait(10)
            raise BenchError(f"builtin engine failed at {level} networks:\n{child.log_tail()}")
        time.sleep(1.0)  # let the loop go idle: nothing pending when measured
        out.append((level, proc.tree_memory([child.pid])))
        ctx.log(f"builtin {level} networks: {out[-1][1]}")
        popen.stdin.write("\n")
        popen.stdin.flush()
    popen.stdin.close()
    popen.wait(60)
    return out


def haproxy_argv(ctx: Context, i: int, netns: str, upstream: Path, destroy: bool) -> list[str]:
    state = ctx.workdir / "hstate"
    return [
        *metaproxy_argv(),
        "--log-level",
        "WARNING",
        "ns-proxy",
        "--engine",
        "haproxy",
        "--network_id",
        f"bench-mem-{i:05d}",
        "--netns",
        netns,
        "--metadata_proxy_socket",
        str(upstream),
        "--state_path",
        str(state),
        "--pid_file",
        str(state / f"net-{i}.pid"),
        *(["--destroy"] if destroy else []),
    ]


def haproxy_levels(ctx: Context, ns: Namespaces, upstream: Path, levels: list[int]) -> list[Level]:
    started: list[int] = []

    def start(i: int) -> None:
        done = subprocess.run(
            haproxy_argv(ctx, i, ns.names[i], upstream, destroy=False),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"haproxy engine front {i} failed: {done.stderr.strip()[-400:]}")
        started.append(i)

    def stop_all() -> None:
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda i: subprocess.run(
                        haproxy_argv(ctx, i, ns.names[i], upstream, destroy=True),
                        capture_output=True,
                        timeout=60,
                        check=False,
                    ),
                    list(started),
                )
            )
        for i in started:  # anything --destroy left behind
            _kill_pidfile(ctx.workdir / "hstate" / f"net-{i}.pid")

    ctx.stack.callback(stop_all)
    out: list[Level] = []
    count = 0
    for level in levels:
        pool = ThreadPoolExecutor(4)
        try:
            list(pool.map(start, range(count, level)))
        finally:
            # On an interrupt, start nothing more: queued starts are dropped, not run.
            pool.shutdown(wait=True, cancel_futures=True)
        count = level
        time.sleep(1.0)
        pids = [_pid(ctx.workdir / "hstate" / f"net-{i}.pid") for i in range(count)]
        out.append((level, proc.tree_memory(p for p in pids if p)))
        ctx.log(f"haproxy {level} networks: {out[-1][1]}")
    return out


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _kill_pidfile(path: Path) -> None:
    pid = _pid(path)
    if pid and proc.comm(pid) == "haproxy":
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def marginal(levels: list[Level]) -> tuple[float | None, float | None]:
    """KiB of RSS and PSS per network between the two largest levels."""
    if len(levels) < 2:
        return None, None
    (n1, m1), (n2, m2) = levels[-2], levels[-1]
    return (m2.rss_kib - m1.rss_kib) / (n2 - n1), (m2.pss_kib - m1.pss_kib) / (n2 - n1)


def run(ctx: Context) -> ScenarioResult:
    quick = ctx.options.quick
    b_levels = [1, 100] if quick else [1, 100, 1000]
    h_levels = [1, 10] if quick else [1, 10, 100]
    result = ScenarioResult(NAME, TITLE)
    nginx, upstream = systems.start_nginx(ctx.workdir)
    ctx.track(nginx)
    ns = Namespaces(max(b_levels[-1], h_levels[-1]))
    ctx.stack.callback(ns.delete)
    ns.create()

    measured: dict[str, list[Level]] = {}
    errors: dict[str, str] = {}
    for name, fn, levels in (
        ("builtin", builtin_levels, b_levels),
        ("haproxy engine", haproxy_levels, h_levels),
    ):
        try:
            measured[name] = fn(ctx, ns, upstream, levels)
        except BenchError as exc:
            errors[name] = str(exc).strip().splitlines()[-1][:200]

    table = Table(
        "RSS and PSS (from /proc/PID/smaps_rollup, all processes of the engine)",
        [
            Column("engine"),
            Column("networks", ",d"),
            Column("processes", "d"),
            Column("RSS MiB", ".1f"),
            Column("PSS MiB", ".1f"),
            Column("RSS KiB/net (step)", ",.1f"),
            Column("PSS KiB/net (step)", ",.1f"),
        ],
    )
    for name, levels in measured.items():
        prev: Level | None = None
        for n, mem in levels:
            step_rss = step_pss = None
            if prev is not None:
                step_rss = (mem.rss_kib - prev[1].rss_kib) / (n - prev[0])
                step_pss = (mem.pss_kib - prev[1].pss_kib) / (n - prev[0])
            table.add(
                name, n, mem.processes, mem.rss_kib / 1024, mem.pss_kib / 1024, step_rss, step_pss
            )
            prev = (n, mem)
    b_rss, b_pss = marginal(measured.get("builtin", []))
    h_rss, h_pss = marginal(measured.get("haproxy engine", []))
    table.notes += [
        "idle listeners on 169.254.169.254:80, one network namespace per network "
        "(made with ip -batch, deleted afterwards); step = growth per added network "
        "since the previous row",
        "builtin: metaproxy.front.builtin's programmatic add() in one process (uvloop); "
        "haproxy engine: `metaproxy ns-proxy --engine haproxy --netns NS` (detached), "
        "haproxy processes summed",
    ]
    table.notes += [f"{k}: unavailable ({v})" for k, v in errors.items()]
    result.tables.append(table)
    result.checks += [
        at_most("memory: builtin RSS KiB per added network (top level)", b_rss, 16),
        _times(
            "memory: haproxy RSS per network / builtin RSS per network", h_rss, b_rss, h_pss, b_pss
        ),
    ]
    result.raw = {
        k: [
            {"networks": n, "rss_kib": m.rss_kib, "pss_kib": m.pss_kib, "processes": m.processes}
            for n, m in v
        ]
        for k, v in measured.items()
    }
    result.raw["unavailable"] = errors
    return result


def _times(
    target: str, h_rss: float | None, b_rss: float | None, h_pss: float | None, b_pss: float | None
) -> Check:
    # A builtin step at or below zero (allocator noise) counts as "at least 100x".
    value = ratio(h_rss, max(b_rss, 0.01)) if b_rss is not None else None
    pss = ratio(h_pss, max(b_pss, 0.01)) if b_pss is not None else None
    met = None if value is None else value >= 100
    detail = f"PSS ratio {pss:.0f}x" if pss is not None else ""
    return Check(target, value, ">= 100", met, detail)
