"""Scenario 4, boot storm: N instances at once, each replaying cloud-init's OpenStack requests."""

from __future__ import annotations

import json
import math
import subprocess
import time
from typing import Any

from bench import fronts, inventory, stack
from bench.context import REPO, Context, module_argv
from bench.loadgen import summarize
from bench.procs import BenchError
from bench.report import Column, ScenarioResult, Table, at_most, median

NAME = "storm"
TITLE = "4. Boot storm: N simulated instances replaying cloud-init (OpenStack datasource)"
HOST_HEADER = "169.254.169.254"


# Instances per generator process: one process starting 1,000 connections spends ~115 ms
# before it handles the first answer, which would count as the systems' latency.
PER_PROCESS = 250


def loadgen(ctx: Context, spec: dict[str, Any], tag: str) -> Any:
    """Run the walk (one process), or a storm split over ceil(N / PER_PROCESS) generator
    processes that start together, merged into one storm's figures."""
    if spec.get("mode") == "walk":
        return json.loads(_generators(ctx, [spec], tag)[0])
    sources = spec["sources"]
    count = max(1, math.ceil(len(sources) / PER_PROCESS))
    start_at = time.time() + 1.0 + 0.25 * count  # every process imported and parked by then
    parts = [
        {**spec, "sources": sources[i::count], "start_at": start_at, "raw": True}
        for i in range(count)
    ]
    return summarize([json.loads(out) for out in _generators(ctx, parts, tag)])


def _generators(ctx: Context, specs: list[dict[str, Any]], tag: str) -> list[str]:
    procs = []
    try:
        for i, spec in enumerate(specs):
            path = ctx.workdir / f"storm-{tag}-{i}.json"
            path.write_text(json.dumps(spec))
            procs.append(
                subprocess.Popen(
                    [*module_argv("bench.loadgen"), str(path)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=REPO,
                )
            )
        outputs = []
        for proc, spec in zip(procs, specs, strict=True):
            try:
                out, err = proc.communicate(timeout=spec["deadline"] + 30)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"load generator did not finish ({tag})") from exc
            if proc.returncode != 0:
                raise BenchError(f"load generator failed ({tag}): {err.strip()[-800:]}")
            outputs.append(out)
        return outputs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def run(ctx: Context) -> ScenarioResult:
    opts = ctx.options
    sizes = [200, 1000]
    rounds = 1 if opts.quick else 3
    engines = ["builtin", "haproxy"]
    result = ScenarioResult(NAME, TITLE)
    sources = inventory.storm_sources(sum(sizes) * rounds * len(engines) + 1)
    host = stack.start_host(ctx, sources)
    agent = stack.start_agent(ctx, host, "agent", None)
    live: list[fronts.Front] = []
    down: list[fronts.Front] = []
    for engine in engines:
        front = fronts.start_engine(
            ctx, engine, agent.socket, network_id=inventory.NETWORK_ID, tag=f"storm-{engine}"
        )
        if front.child is not None:
            front.also = [agent.child.pid, host.server.pid]
        (live if front.up else down).append(front)
    if not live:
        raise BenchError("no front could start: " + "; ".join(f.error for f in down))

    base = {"host": "127.0.0.1", "host_header": HOST_HEADER, "timeout": 10.0, "deadline": 150}
    walk_spec = {**base, "port": live[0].port, "sources": [sources[-1]], "mode": "walk"}
    sequence = loadgen(ctx, walk_spec, "walk")
    bad = [s for s in sequence if s[2] not in (200, 404)]
    if bad or not sequence:
        raise BenchError(f"cloud-init's walk got unexpected answers: {bad[:5]}")

    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    next_source = 0
    for rnd in range(rounds):
        for front in live if rnd % 2 == 0 else live[::-1]:
            for size in sizes:
                batch = sources[next_source : next_source + size]
                next_source += size
                ctx.log(f"storm round {rnd + 1}/{rounds} {front.name} N={size}")
                cpu0 = front.cpu_seconds()
                out = loadgen(
                    ctx,
                    {**base, "port": front.port, "sources": batch, "sequence": sequence},
                    f"{front.name}-{size}-{rnd}",
                )
                out["cpu_s"] = front.cpu_seconds() - cpu0
                runs.setdefault((front.name, size), []).append(out)

    table = Table(
        f"all instances start at once; medians of {rounds} storm(s) per row; fresh instances "
        "(cold agent cache) each time",
        [
            Column("front"),
            Column("instances", ",d"),
            Column("requests", ",d"),
            Column("all served s", ".2f"),
            Column("req/s", ",.0f"),
            Column("p50 ms", ".1f"),
            Column("p99 ms", ".1f"),
            Column("max ms", ".0f"),
            Column("p99 1st req ms", ".1f"),
            Column("p99 later ms", ".1f"),
            Column("CPU s", ".1f"),
            Column("errors", "d"),
        ],
    )
    for front in live:
        for size in sizes:
            rs = runs.get((front.name, size), [])

            def med(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
                return median([r[key] for r in rs])

            table.add(
                front.label,
                size,
                rs[0]["requests"] if rs else None,
                med("wall_s"),
                med("rps"),
                med("p50_ms"),
                med("p99_ms"),
                med("max_ms"),
                med("first_p99_ms"),
                med("rest_p99_ms"),
                med("cpu_s"),
                sum(r["errors"] for r in rs),
            )
    kinds: dict[str, int] = {}
    for rs in runs.values():
        for r in rs:
            for k, v in r["error_kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
    table.notes += [
        f"each instance: {len(sequence)} requests on one keep-alive connection from its own "
        "source address (127.1.x.y, mapped to its port in the store), the sequence cloud-init "
        "22.4.2's OpenStack datasource makes (/openstack x2, 5 files, the EC2 meta-data walk)",
        f"front on 127.0.0.1 -> agent (cache_ttl 30 s, --pipeline {stack.pipeline()}) -> "
        "embedded metadata server; the load generator (Python, uvloop; one process per "
        f"{PER_PROCESS} instances, started together) shares the 2 cores; CPU s = front + agent + "
        "server during the storm; the first request of an instance includes its TCP connect; "
        "an error is a timeout (10 s), a broken connection, or a "
        "status other than the one cloud-init's walk got",
    ]
    if kinds:
        table.notes.append(f"errors by kind: {kinds}")
        for front in live:
            table.notes += [
                f"{front.label} logged: {p}" for p in front.problems([agent.child, host.server])
            ]
    table.notes += [f"{f.label}: unavailable ({f.error})" for f in down]
    result.tables.append(table)
    big = runs.get(("builtin", sizes[-1]), [])
    result.checks += [
        at_most(
            f"boot storm {sizes[-1]}: builtin errors",
            float(sum(r["errors"] for r in big)) if big else None,
            0,
        ),
        at_most(
            f"boot storm {sizes[-1]}: builtin p99 ms (median of storms)",
            median([r["p99_ms"] for r in big]),
            250,
        ),
    ]
    result.raw = {
        "sequence": sequence,
        "runs": {f"{k[0]}@{k[1]}": v for k, v in runs.items()},
        "unavailable": {f.name: f.error for f in down},
    }
    return result
